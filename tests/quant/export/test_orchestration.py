"""export_quantized_model: int8 ops, agreement with the dygraph model, JSON, fallback, errors."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import paddle
import pytest
from paddle import nn

import qtrainer.quant.export.orchestration as export_module
import qtrainer.quant.export.plan as plan_module
from qtrainer.quant.export import ExportCheckError, export_quantized_model
from qtrainer.quant.export.isa import has_vnni, int8_isa, target_note
from qtrainer.quant.export.inference import load_int8_predictor, read_params, read_program_ops, run_predictor
from qtrainer.quant.export.selfcheck import compare_samples
from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.transforms.wrap import iter_quanted_layers, quantize_model

SPEC_MNIST = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]


# ---------------------------------------------------------------------- models and data
def cnn() -> nn.Layer:
    """Two conv blocks (bias-free convs before batch norms) and a two-Linear head."""
    return nn.Sequential(
        nn.Conv2D(1, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU(), nn.MaxPool2D(2),
        nn.Conv2D(16, 32, 3, padding=1, bias_attr=False), nn.BatchNorm2D(32), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def fmnist():
    from qtrainer.data import FashionMNISTDataset

    try:
        train = FashionMNISTDataset("train", limit=3000)
        test = FashionMNISTDataset("test", limit=1024)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return (train.images, np.asarray(train.labels).reshape(-1).astype("int64"),
            test.images, np.asarray(test.labels).reshape(-1).astype("int64"))


def train(net: nn.Layer, images, labels, steps: int, lr: float, seed: int = 0) -> nn.Layer:
    rng = np.random.RandomState(seed)
    optimizer = paddle.optimizer.Adam(lr, parameters=net.parameters())
    net.train()
    for _ in range(steps):
        index = rng.randint(0, len(labels), 64)
        loss = nn.functional.cross_entropy(net(paddle.to_tensor(images[index])), paddle.to_tensor(labels[index]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    net.eval()
    return net


@pytest.fixture(scope="module")
def fp32_cnn(fmnist):
    images, labels, _, _ = fmnist
    paddle.seed(0)
    return train(cnn(), images, labels, 60, 2e-3)


def qat_cnn(fmnist, fp32_net, config=None, qat_steps=40) -> nn.Layer:
    images, labels, _, _ = fmnist
    net = copy.deepcopy(fp32_net)
    QAT(config=config).quantize(net)
    return train(net, images, labels, qat_steps, 5e-4, seed=1)


@pytest.fixture(scope="module")
def trained(fmnist, fp32_cnn):
    return qat_cnn(fmnist, fp32_cnn)


def samples(fmnist, start=0, stop=512, batch=128):
    test_images = fmnist[2]
    return [test_images[i:i + batch] for i in range(start, stop, batch)]


def dygraph(net, batches):
    with paddle.no_grad():
        return np.concatenate([net(paddle.to_tensor(b)).numpy() for b in batches])


def tiny_quantized(config=None) -> nn.Layer:
    """A tiny conv + Linear model with observed scales (no real training)."""
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    quantize_model(net, config)  # the engine: QAT refuses more than 8 bits
    net.train()
    with paddle.no_grad():
        for seed in range(3):
            net(paddle.to_tensor(tiny_batch(seed)))
    net.eval()
    return net


def tiny_batch(seed=0, n=8):
    return np.random.RandomState(seed).rand(n, 1, 6, 6).astype("float32")


TINY_SPEC = [paddle.static.InputSpec([None, 1, 6, 6], "float32", "x")]


def all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---------------------------------------------------------------------- the main path
def test_export_runs_int8_and_agrees_with_dygraph(trained, fmnist, tmp_path):
    prefix = str(tmp_path / "model")
    report = export_quantized_model(trained, prefix, sample_inputs=samples(fmnist))
    assert report.passed and report.written
    assert report.check.top1_agreement >= 0.995
    # every layer not kept float runs as one int8 op (conv, and Linear as 1x1 conv)
    assert report.check.expected_int8_ops == len(report.int8_layers) >= 3
    assert sum(report.check.int8_ops.values()) == len(report.int8_layers)
    # independently: a fresh predictor on images the check did not see
    predictor, counts = load_int8_predictor(prefix)
    assert sum(counts.values()) == len(report.int8_layers)
    held_out = samples(fmnist, 512, 1024)
    [deployed] = run_predictor(predictor, [[b] for b in held_out])
    reference = dygraph(trained, held_out)
    assert np.linalg.norm(deployed - reference) / np.linalg.norm(reference) < 0.05
    # judged as the self-check judges: top-1 on the samples whose margin is above the tolerated error
    comparison = compare_samples([deployed], [reference], margin_rel_l2=report.check.max_rel_l2)
    assert comparison.top1_agreement >= 0.995
    if has_vnni():  # exact int8: every answer, near-ties included
        assert comparison.top1_agreement_all >= 0.995
    else:  # the first conv's s8 input runs on 7-bit weights here: a few near-tied answers may flip
        assert comparison.top1_agreement_all >= 0.98


def test_user_model_is_unchanged(trained, fmnist, tmp_path):
    trained.train()
    before = {k: v.numpy().copy() for k, v in trained.state_dict().items()}
    types_before = [type(l).__name__ for l in trained.sublayers()]
    x = paddle.to_tensor(samples(fmnist)[0])
    trained.eval()
    out_before = trained(x).numpy()
    trained.train()
    export_quantized_model(trained, str(tmp_path / "model"), sample_inputs=samples(fmnist))
    assert trained.training  # the mode is the user's
    after = trained.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key].numpy(), value, err_msg=key)
    assert [type(l).__name__ for l in trained.sublayers()] == types_before
    trained.eval()
    np.testing.assert_array_equal(trained(x).numpy(), out_before)


def _all_flags() -> dict:
    from paddle.base import core

    flags = {}
    for name in core.globals().keys():
        try:
            flags[name] = paddle.get_flags([name])[name]
        except ValueError:  # a few flags cannot be read through get_flags
            continue
    return flags


def test_process_state_is_unchanged(tmp_path):
    net = tiny_quantized()
    flags = _all_flags()
    assert len(flags) > 100
    dtype = paddle.get_default_dtype()
    pir = paddle.framework.use_pir_api()
    export_quantized_model(net, str(tmp_path / "m"), input_spec=TINY_SPEC, sample_inputs=[tiny_batch(5)])
    assert paddle.in_dynamic_mode()
    assert paddle.framework.use_pir_api() == pir
    assert _all_flags() == flags
    assert paddle.get_default_dtype() == dtype
    # dygraph still works as before
    assert net(paddle.to_tensor(tiny_batch(1))).shape == [8, 3]


def test_json_describes_the_export(trained, fmnist, tmp_path):
    prefix = str(tmp_path / "model")
    report = export_quantized_model(trained, prefix, sample_inputs=samples(fmnist))
    with open(prefix + ".quant.json") as handle:
        data = json.load(handle)
    assert data["format"] == "qtrainer-int8" and data["paddle"] == paddle.__version__
    assert data["files"]["pdmodel"] == prefix + ".pdmodel" and os.path.isfile(data["files"]["pdiparams"])
    assert data["input_spec"] == [{"name": "x", "shape": [-1, 1, 28, 28], "dtype": "float32"}]
    quanted = dict(iter_quanted_layers(trained))
    assert [entry["name"] for entry in data["layers"]] == ["0", "4", "9", "11"]  # forward order
    for entry in data["layers"]:
        layer = quanted[entry["name"]]
        assert entry["act_bits"] == 8 and entry["weight_bits"] == 8
        assert entry["act_scale"] == pytest.approx(float(layer.act_scale().item()), rel=1e-6)
        np.testing.assert_allclose(entry["weight_scale"], layer.weight_scale().numpy(), rtol=1e-6)
        assert entry["calls"] == 1
    first = data["layers"][0]
    assert first["act_signed"] is True and first["input_min"] < 0  # normalised images
    # after ReLU: unsigned; u8 scale T * 255 / 127 (the default portable target: the simulation's grid)
    assert data["target"] == {"name": "portable", "on_other_cpus": target_note("portable")}
    factor = 255 / 127
    for entry in data["layers"][1:]:
        assert entry["act_signed"] is False
        if entry["export"] == "int8":
            assert entry["deploy_act_scale"] == pytest.approx(entry["act_scale"] * factor, rel=1e-6)
    check = data["check"]
    assert check["passed"] is report.passed is True
    assert data["checked_on"] == {"int8_isa": int8_isa()}  # the self-check's numbers hold for this ISA
    assert check["samples"] == 512 and check["sample_source"] == "given"
    assert check["rel_l2"] == pytest.approx(report.check.rel_l2)
    assert check["int8_ops_total"] == len(data["int8_layers"])
    assert data["kept_float"] == report.kept_float
    assert data["attempts"] and data["attempts"][-1]["check"]["passed"]


# ---------------------------------------------------------------------- bits, PACT
def test_pact_alpha_is_the_exported_scale(fmnist, fp32_cnn, tmp_path):
    net = qat_cnn(fmnist, fp32_cnn, {"activation_preprocess_type": "PACT", "pact_warmup_steps": 5}, qat_steps=30)
    prefix = str(tmp_path / "pact")
    report = export_quantized_model(net, prefix, sample_inputs=samples(fmnist))
    quanted = dict(iter_quanted_layers(net))
    for entry in report.layers:
        alpha = abs(float(quanted[entry.name].act_preprocess.alpha.item()))
        assert entry.act_pact and entry.act_scale == pytest.approx(alpha, rel=1e-6)
    assert report.passed and report.check.top1_agreement >= 0.99
    # alpha is a scale, not an op: no clip in the exported program
    assert "clip" not in {op.type for op in read_program_ops(prefix + ".pdmodel")}


def test_w4a8_deploys_its_simulated_levels(fmnist, fp32_cnn, tmp_path):
    """4-bit weights are simulated on the int8 levels Paddle's kernels hold, so every layer
    deploys int8 with no fallback and the deployment matches the simulation as closely as W8A8."""
    net = qat_cnn(fmnist, fp32_cnn, {"weight_bits": 4, "activation_preprocess_type": "PACT", "pact_warmup_steps": 5})
    report = export_quantized_model(net, str(tmp_path / "w4a8"), sample_inputs=samples(fmnist), fallback=False)
    assert report.passed and not report.kept_float and len(report.int8_layers) == 4
    assert report.check.rel_l2 < 0.03 and report.check.top1_agreement >= 0.995
    levels = {round(k * 127 / 7) for k in range(8)}  # 0, 18, 36, 54, 73, 91, 109, 127
    quanted = dict(iter_quanted_layers(net))
    for entry in report.layers:
        assert entry.weight_bits == 4 and entry.weight_grid_error < 1e-3
        np.testing.assert_allclose(entry.deploy_weight_scale, entry.weight_scale, rtol=1e-6)
        simulated = quanted[entry.name].quantized_weight().numpy()
        threshold = np.asarray(entry.weight_scale).reshape([-1] + [1] * (simulated.ndim - 1))
        if entry.type == "Linear":
            threshold = threshold.reshape([1, -1])
        assert set(np.unique(np.abs(np.round(simulated / threshold * 127)))) <= levels
    int8_weights = [v for v in read_params(str(tmp_path / "w4a8")).values() if v.dtype == np.int8]
    assert len(int8_weights) == 4
    for weight in int8_weights:
        assert set(np.unique(np.abs(weight.astype(int)))) <= levels and np.abs(weight.astype(int)).max() == 127


class SmallResNet(nn.Layer):
    """A stem and two ResNet basic blocks (the second with a strided downsample branch)."""

    def __init__(self) -> None:
        super().__init__()
        from paddle.vision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2D(1, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU())
        self.block1 = BasicBlock(16, 16)
        down = nn.Sequential(nn.Conv2D(16, 32, 1, stride=2, bias_attr=False), nn.BatchNorm2D(32))
        self.block2 = BasicBlock(16, 32, stride=2, downsample=down)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


@pytest.mark.slow
def test_residual_adds_fuse_where_the_identity_is_quantized(fmnist, tmp_path, monkeypatch):
    """A block whose identity input is quantized (``quantize_residual_inputs``, the default) fuses
    conv + add in Paddle and matches the simulation; the projection block's add (a float identity)
    keeps its convs in float output behind a no-op Paddle does not fuse through. Without either,
    Paddle fuses conv + add on an unquantized input and the deployment leaves the simulation."""
    images, labels, _, _ = fmnist
    paddle.seed(0)
    net = train(SmallResNet(), images, labels, 60, 2e-3)
    fp32 = copy.deepcopy(net)
    baseline = copy.deepcopy(net)
    QAT().quantize(net)
    train(net, images, labels, 20, 5e-4, seed=1)
    # the stem (signed input: s8 kernels are inexact without VNNI) as fake-quant, as the self-check would
    options = dict(sample_inputs=samples(fmnist), fallback=False, strict_int8=True, on_failure="write",
                   fake_quant_layers=["stem.0"])
    report = export_quantized_model(net, str(tmp_path / "res"), **options)
    flagged = {e.name for e in report.layers if e.float_output}
    assert flagged == {"block2.conv2", "block2.downsample.0"}
    assert report.passed and sum(report.check.int8_ops.values()) == len(report.int8_layers) == 6
    assert report.check.rel_l2 < 0.01 and report.check.top1_agreement >= 0.995
    graph: dict = {}
    load_int8_predictor(str(tmp_path / "res"), graph=graph)
    assert graph["conv +residual"] == 1  # block1's conv2 + add (+ relu) run as one int8 kernel
    # the barrier follows each flagged conv's batch norm, which Paddle folds into the int8 conv
    assert graph["batch_norm"] == 0

    # the float identity (the option off): every residual conv keeps the barrier, as before
    QAT({"quantize_residual_inputs": False}).quantize(baseline)
    train(baseline, images, labels, 20, 5e-4, seed=1)
    plain = export_quantized_model(baseline, str(tmp_path / "plain"), **options)
    assert {e.name for e in plain.layers if e.float_output} == {"block1.conv2", "block2.conv2", "block2.downsample.0"}
    assert plain.passed and plain.check.rel_l2 < 0.01
    plain_graph: dict = {}
    load_int8_predictor(str(tmp_path / "plain"), graph=plain_graph)
    assert plain_graph["conv +residual"] == 0 and plain_graph["scale"] == graph["scale"] + 1
    assert plain_graph["batch_norm"] == 0

    # PTQ folds the batch norms into biased convs: the bias add is not a residual add
    from qtrainer.quant.methods.ptq import PTQ, calibrate

    ptq = PTQ(activation_quantizer="AbsmaxQuantizer")
    folded = ptq.quantize(fp32, fuse=True)
    calibrate(folded, [paddle.to_tensor(images[i:i + 128]) for i in range(0, 512, 128)])
    ptq_report = ptq.save_quantized_model(folded, str(tmp_path / "ptq"), **options)
    assert {e.name for e in ptq_report.layers if e.float_output} == flagged
    assert ptq_report.passed and sum(ptq_report.check.int8_ops.values()) == len(ptq_report.int8_layers) == 6

    monkeypatch.setattr(export_module, "residual_conv_weights", lambda ops: set())
    fused = export_quantized_model(net, str(tmp_path / "fused"), **options)
    assert not any(e.float_output for e in fused.layers)
    assert sum(fused.check.int8_ops.values()) < len(fused.int8_layers) or fused.check.rel_l2 > 2 * report.check.rel_l2


def test_ptq_model_exports_and_agrees(fmnist, fp32_cnn, tmp_path):
    """PTQ (KL calibrators, conv+BN folded) goes through the same export."""
    from qtrainer.quant.methods.ptq import PTQ, calibrate

    ptq = PTQ(activation_quantizer="KLQuantizer")
    net = ptq.quantize(fp32_cnn, fuse=True)
    calibrate(net, [paddle.to_tensor(fmnist[0][i:i + 128]) for i in range(0, 1024, 128)])
    report = ptq.save_quantized_model(net, str(tmp_path / "ptq"), sample_inputs=samples(fmnist))
    assert report.passed and report.check.top1_agreement >= 0.995
    assert len(report.int8_layers) >= 3
    thresholds = {name: float(layer.act_scale().item()) for name, layer in iter_quanted_layers(net)}
    assert {e.name: e.act_scale for e in report.layers} == pytest.approx(thresholds, rel=1e-6)


def test_a4_activations_deploy_on_the_simulated_grid(tmp_path):
    """4-bit activations: explicit clip + the coarse grid; the deployment matches the simulation."""
    net = tiny_quantized({"activation_bits": 4})
    report = export_quantized_model(net, str(tmp_path / "a4"), sample_inputs=[tiny_batch(s, 32) for s in (7, 8)])
    assert all(e.act_clip and e.deploy_act_scale == pytest.approx(e.act_scale * 255 / 7, rel=1e-6)
               for e in report.layers if e.export == "int8")
    assert report.check.rel_l2 < 1e-3 and report.check.top1_agreement == 1.0


def test_sixteen_bit_layers_stay_float_and_are_reported(tmp_path):
    paddle.seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2D(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
    )
    quantize_model(net[0], {"activation_bits": 16, "weight_bits": 16})
    quantize_model(net[1], None)
    net.train()
    with paddle.no_grad():
        net(paddle.to_tensor(tiny_batch(1)))
    net.eval()
    report = export_quantized_model(net, str(tmp_path / "m"), sample_inputs=[tiny_batch(2, 32)])
    assert report.kept_float == {"0.0": pytest.approx(report.kept_float["0.0"])}
    assert "16-bit" in report.kept_float["0.0"]
    assert report.int8_layers == ["1.0", "1.3"] and report.passed


def test_all_sixteen_bit_is_an_error(tmp_path):
    net = tiny_quantized({"activation_bits": 16, "weight_bits": 16})
    with pytest.raises(ValueError, match="no layer can be exported as int8.*16-bit"):
        export_quantized_model(net, str(tmp_path / "m"), input_spec=TINY_SPEC)
    assert all_files(tmp_path) == []


def test_keep_float_patterns(tmp_path):
    net = tiny_quantized()
    # the float Linear differs from its quantized simulation; the check says by how much
    report = export_quantized_model(net, str(tmp_path / "m"), sample_inputs=[tiny_batch(3, 32)],
                                    keep_float=["3"], min_agreement=0.0, fallback=False)
    assert report.kept_float == {"3": "keep_float"} and report.int8_layers == ["0"]
    assert report.layers[1].export == "float" and 0.0 < report.check.rel_l2 < 0.05
    assert report.check.int8_ops and sum(report.check.int8_ops.values()) == 1


def test_linear_on_3d_input(tmp_path):
    paddle.seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    QAT().quantize(net)
    net.train()
    data = [np.random.RandomState(s).randn(4, 5, 8).astype("float32") for s in range(3)]
    with paddle.no_grad():
        for x in data:
            net(paddle.to_tensor(x))
    net.eval()
    prefix = str(tmp_path / "seq")
    report = export_quantized_model(net, prefix, sample_inputs=data, min_agreement=0.9)
    assert report.check.samples == 12 and report.check.rel_l2 < 0.05
    [out] = run_predictor(load_int8_predictor(prefix)[0], [data[0]])
    assert out.shape == (4, 5, 4)


# ---------------------------------------------------------------------- self-check and fallback
def test_failing_int8_layer_falls_back_to_float(trained, fmnist, tmp_path, monkeypatch):
    """Force the all-int8 export to fail numerically on any CPU: the signed-input first conv is the first guess."""
    real_judge = export_module.judge
    total = len(list(iter_quanted_layers(trained)))

    def judge(samples, rel_l2, agreement, int8_ops, expected, *args, **kwargs):
        result = real_judge(samples, rel_l2, agreement, int8_ops, expected, *args, **kwargs)
        if expected == total:
            # a numeric failure, whatever this CPU computes: the fallback search must run
            result.failures.append("forced: all-int8 export rejected by the test")
            result.numeric_failures += 1
        return result

    monkeypatch.setattr(export_module, "judge", judge)
    prefix = str(tmp_path / "model")
    report = export_quantized_model(trained, prefix, sample_inputs=samples(fmnist))
    assert report.passed
    assert list(report.kept_float) == ["0"]
    first = report.layers[0]
    assert first.export == "fake-quant" and "self-check" in first.reason and "signed input" in first.reason
    assert report.check.expected_int8_ops == total - 1
    assert [a["fallback_layers"] for a in report.attempts] == [[], ["0"]]
    with open(prefix + ".quant.json") as handle:
        data = json.load(handle)
    assert data["kept_float"] == {"0": first.reason} and data["layers"][0]["export"] == "fake-quant"
    # the float fallback computes the simulated values: the deployment matches the dygraph model
    assert report.check.top1_agreement >= 0.995


def test_fake_quant_layers_are_forced_from_the_start(trained, fmnist, tmp_path):
    report = export_quantized_model(trained, str(tmp_path / "m"), sample_inputs=samples(fmnist),
                                    fake_quant_layers=["0"])
    assert report.kept_float == {"0": "fake_quant_layers"} and report.layers[0].export == "fake-quant"
    assert [a["fallback_layers"] for a in report.attempts] == [["0"]]
    assert report.check.expected_int8_ops == 3 and report.check.top1_agreement >= 0.995


def test_failed_check_raises_and_writes_nothing(trained, fmnist, tmp_path):
    with pytest.raises(ExportCheckError, match="self-check failed") as info:
        export_quantized_model(trained, str(tmp_path / "model"), sample_inputs=samples(fmnist),
                               max_rel_l2=0.0, fallback=False)
    assert info.value.report.passed is False and "rel_l2" in info.value.report.check.failures[0]
    assert all_files(tmp_path) == []


def test_failed_check_can_be_written_with_an_honest_report(trained, fmnist, tmp_path):
    prefix = str(tmp_path / "model")
    report = export_quantized_model(trained, prefix, sample_inputs=samples(fmnist), max_rel_l2=0.0,
                                    fallback=False, on_failure="write")
    assert report.written and report.passed is False
    with open(prefix + ".quant.json") as handle:
        assert json.load(handle)["check"]["passed"] is False


def test_a_broken_int8_deployment_is_caught(trained, fmnist, tmp_path, monkeypatch):
    """Weights deployed on half their scale (a broken export, on any CPU): the check fails, nothing written."""
    monkeypatch.setattr(plan_module, "INT8_QMAX", 63)
    with pytest.raises(ExportCheckError, match="self-check failed") as info:
        export_quantized_model(trained, str(tmp_path / "model"), sample_inputs=samples(fmnist), fallback=False)
    check = info.value.report.check
    assert check.rel_l2 > 0.3 and "rel_l2" in check.failures[0]
    assert all_files(tmp_path) == []


def test_a_broken_deployment_is_caught_when_the_outputs_are_near_tied(tmp_path, monkeypatch):
    """An untrained model (near-tied scores: top-1 is not judged) still fails on its relative L2 error."""
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with paddle.no_grad():  # scores 1 + tiny differences, as from an untrained classifier
        net[3].weight.set_value(net[3].weight * 1e-3)
        net[3].bias.set_value(paddle.ones([3]))
    quantize_model(net, None)
    net.train()
    with paddle.no_grad():
        net(paddle.to_tensor(tiny_batch(0)))
    net.eval()
    batches = [tiny_batch(s, 32) for s in (1, 2)]
    assert export_quantized_model(net, str(tmp_path / "ok"), sample_inputs=batches).check.judged_samples == 0
    monkeypatch.setattr(plan_module, "INT8_QMAX", 63)
    with pytest.raises(ExportCheckError, match="self-check failed") as info:
        export_quantized_model(net, str(tmp_path / "m"), sample_inputs=batches, fallback=False)
    check = info.value.report.check
    assert check.judged_samples == 0 and check.rel_l2 < 0.05  # the common offset hides the error...
    assert check.centered_rel_l2 > 0.3 and "around each sample's mean" in check.failures[0]  # ...not here


def test_the_check_reports_its_worst_samples_and_how_many_were_judged(trained, fmnist, tmp_path):
    prefix = str(tmp_path / "model")
    report = export_quantized_model(trained, prefix, sample_inputs=samples(fmnist))
    check = report.check
    assert 0 < check.judged_samples <= check.samples == 512
    assert len(check.worst_samples) == 5
    worst = [w["rel_l2"] for w in check.worst_samples]
    assert worst == sorted(worst, reverse=True) and worst[0] == check.sample_rel_l2_quantiles["max"]
    with open(prefix + ".quant.json") as handle:
        data = json.load(handle)["check"]
    assert data["judged_samples"] == check.judged_samples and data["worst_samples"][0]["index"] == check.worst_samples[0]["index"]


def test_random_samples_are_a_caveat(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.export"):
        report = export_quantized_model(tiny_quantized(), str(tmp_path / "m"), input_spec=TINY_SPEC)
    assert report.written and any("random inputs" in c for c in report.check.caveats)
    assert any("self-check is weak" in r.getMessage() for r in caplog.records)


class _DownsampleBlock(nn.Layer):
    """A ResNet-style block whose shortcut is a conv + batch norm (as at a ResNet stage entry)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2D(1, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.conv2, self.bn2 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.down, self.bn_down = nn.Conv2D(1, 8, 1, bias_attr=False), nn.BatchNorm2D(8)

    def forward(self, x):
        y = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
        return nn.functional.relu(y + self.bn_down(self.down(x))).mean(axis=[2, 3])


def test_int8_op_count_shortfall_is_a_note_unless_strict(tmp_path, monkeypatch):
    """Without the residual no-op Paddle fuses conv2 with the add of the unquantized shortcut and
    runs it in float: a note, or a failure with strict_int8."""
    monkeypatch.setattr(export_module, "residual_conv_weights", lambda ops: set())
    paddle.seed(0)
    net = _DownsampleBlock()
    QAT().quantize(net)
    net.train()
    with paddle.no_grad():
        for seed in range(3):
            net(paddle.to_tensor(tiny_batch(seed) - 0.5))
    net.eval()
    batches = [tiny_batch(s, 32) - 0.5 for s in (4, 5)]  # a signed input, as in a ResNet
    report = export_quantized_model(net, str(tmp_path / "a"), sample_inputs=batches, min_agreement=0.0,
                                    fallback=False)
    assert report.passed and report.check.expected_int8_ops == 3
    assert sum(report.check.int8_ops.values()) == 2 and "run in float" in report.check.notes[0]
    with pytest.raises(ExportCheckError, match="run in float"):
        export_quantized_model(net, str(tmp_path / "b"), sample_inputs=batches, min_agreement=0.0,
                               strict_int8=True, fallback=False)
    assert not os.path.exists(tmp_path / "b.pdmodel")


def test_no_check(tmp_path):
    prefix = str(tmp_path / "m")
    report = export_quantized_model(tiny_quantized(), prefix, input_spec=TINY_SPEC, check=False)
    assert report.check is None and report.passed is None and report.attempts[0]["check"] is None
    with open(prefix + ".quant.json") as handle:
        assert json.load(handle)["check"] is None
    assert sum(load_int8_predictor(prefix)[1].values()) == 2


def test_samples_from_a_loader(tmp_path):
    data = paddle.io.TensorDataset([paddle.to_tensor(tiny_batch(4, 40)), paddle.zeros([40, 1], "int64")])
    loader = paddle.io.DataLoader(data, batch_size=16)
    report = export_quantized_model(tiny_quantized(), str(tmp_path / "m"), sample_inputs=loader)
    assert report.sample_source == "loader" and report.check.samples == 40


def test_qat_save_quantized_model_uses_the_export(tmp_path):
    net = tiny_quantized()
    report = QAT().save_quantized_model(net, str(tmp_path / "m"), input_spec=TINY_SPEC,
                                        sample_inputs=[tiny_batch(9, 32)])
    assert report.written and os.path.isfile(str(tmp_path / "m.pdmodel"))


# ---------------------------------------------------------------------- errors, nothing written
def test_float_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no quantized layer"):
        export_quantized_model(nn.Sequential(nn.Linear(2, 2)), str(tmp_path / "m"))
    assert all_files(tmp_path) == []


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory; the export path is a file prefix"):
        export_quantized_model(tiny_quantized(), str(tmp_path), input_spec=TINY_SPEC)
    with pytest.raises(ValueError, match="without extension"):
        export_quantized_model(tiny_quantized(), str(tmp_path / "m.pdmodel"), input_spec=TINY_SPEC)
    assert all_files(tmp_path) == []


def test_existing_export_needs_overwrite(tmp_path):
    prefix = str(tmp_path / "m")
    export_quantized_model(tiny_quantized(), prefix, input_spec=TINY_SPEC, check=False)
    stamp = os.path.getmtime(prefix + ".pdmodel")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_quantized_model(tiny_quantized(), prefix, input_spec=TINY_SPEC, check=False)
    assert os.path.getmtime(prefix + ".pdmodel") == stamp
    export_quantized_model(tiny_quantized(), prefix, input_spec=TINY_SPEC, check=False, overwrite=True)
    assert sorted(all_files(tmp_path)) == ["m.pdiparams", "m.pdiparams.info", "m.pdmodel", "m.quant.json"]


def test_unwritable_path_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot write the export"):
        export_quantized_model(tiny_quantized(), str(blocker / "m"), input_spec=TINY_SPEC)
    assert all_files(tmp_path) == ["file"]


def test_input_spec_not_matching_the_model(tmp_path):
    spec = [paddle.static.InputSpec([None, 3, 6, 6], "float32", "x")]
    with pytest.raises(ValueError, match=r"input_spec \[InputSpec\(shape=\[-1, 3, 6, 6\].*does not match"):
        export_quantized_model(tiny_quantized(), str(tmp_path / "new" / "m"), input_spec=spec)
    assert all_files(tmp_path) == [] and not os.path.exists(tmp_path / "new")
    with pytest.raises(ValueError, match=r"sample batch 0 has shape \[8, 1, 5, 5\]"):
        export_quantized_model(tiny_quantized(), str(tmp_path / "m"), input_spec=TINY_SPEC,
                               sample_inputs=[np.zeros([8, 1, 5, 5], "float32")])


def test_untrained_quantized_model_is_refused(tmp_path):
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU())
    QAT().quantize(net)
    with pytest.raises(ValueError, match="have seen no data"):
        export_quantized_model(net, str(tmp_path / "m"), input_spec=TINY_SPEC)
    assert all_files(tmp_path) == []


class _NoScaleQuanter(nn.Layer):
    def __init__(self, quant_bits=8):
        super().__init__()

    def forward(self, x):
        return x


def test_user_quanter_without_scale_is_refused(tmp_path):
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU())
    QAT(act_quantize=_NoScaleQuanter).quantize(net)
    with pytest.raises(TypeError, match=r"act_quanter \(_NoScaleQuanter\) has no scale\(\) method"):
        export_quantized_model(net, str(tmp_path / "m"), input_spec=TINY_SPEC)
    assert all_files(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"on_failure": "ignore"}, "on_failure='ignore' is not valid"),
        ({"min_agreement": 1.5}, "min_agreement=1.5"),
        ({"clip_activations": "yes"}, "clip_activations='yes' is not valid"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_quantized_model(tiny_quantized(), str(tmp_path / "m"), input_spec=TINY_SPEC, **kwargs)
