"""Publishing an export: the report last with the files' SHA-256, checked by our loaders; own vs foreign
exports; staging directories of killed exports swept."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import paddle
import pytest
from paddle import nn

import qtrainer.quant.export.files as publish_module
from qtrainer.quant.export import check_export_target, export_quantized_model
from qtrainer.quant.export.inference import create_predictor, load_int8_predictor, read_params
from qtrainer.quant.export.files import ExportIntegrityError, sweep_stale_staging
SPEC = [paddle.static.InputSpec([None, 1, 6, 6], "float32", "x")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# the model of the killed subprocess (and of the tests): a conv and a Linear with observed scales
TINY_MODEL = textwrap.dedent("""
    import numpy as np
    import paddle
    from paddle import nn
    from qtrainer.quant.methods.qat import QAT

    def tiny(seed):
        paddle.seed(seed)
        net = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        QAT().quantize(net)
        net.train()
        with paddle.no_grad():
            for s in range(3):
                net(paddle.to_tensor(np.random.RandomState(s).rand(8, 1, 6, 6).astype("float32")))
        net.eval()
        return net
""")
exec(TINY_MODEL)  # defines tiny(seed)


def export(prefix, seed=0, **kwargs):
    return export_quantized_model(tiny(seed), str(prefix), input_spec=SPEC, check=False, **kwargs)  # noqa: F821


def staging_dirs(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".export-tmp"))


# ---------------------------------------------------------------------- the report vouches for the files
def test_report_is_written_last_with_the_sha256_of_each_model_file(tmp_path):
    export(tmp_path / "m")
    with open(tmp_path / "m.quant.json") as handle:
        report = json.load(handle)
    assert report["state"] == "complete"
    assert sorted(report["sha256"]) == ["m.pdiparams", "m.pdiparams.info", "m.pdmodel"]
    assert report["sha256"]["m.pdiparams"] == publish_module.sha256_file(str(tmp_path / "m.pdiparams"))


def test_files_from_two_exports_are_refused_by_the_loader(tmp_path):
    export(tmp_path / "a", seed=0)
    export(tmp_path / "b", seed=1)
    os.replace(tmp_path / "b.pdiparams", tmp_path / "a.pdiparams")  # a's program, b's weights
    for load in (lambda p: create_predictor(p), lambda p: load_int8_predictor(p), read_params):
        with pytest.raises(ExportIntegrityError, match=r"a\.pdiparams.*does not match the export report"):
            load(str(tmp_path / "a"))


def test_a_model_for_vnni_cpus_opened_on_a_cpu_without_vnni_warns(tmp_path, monkeypatch):
    export(tmp_path / "v", target="vnni")
    export(tmp_path / "p", target="portable")
    with open(tmp_path / "v.quant.json") as handle:
        assert json.load(handle)["target"]["name"] == "vnni"
    monkeypatch.setattr(publish_module, "int8_isa", lambda: "avx2")
    with pytest.warns(RuntimeWarning, match=r"exported for target 'vnni' and this CPU's int8 ISA is 'avx2'.*"
                                            r"overflow 16 bits.*target='portable'"):
        create_predictor(str(tmp_path / "v"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        create_predictor(str(tmp_path / "p"))  # portable: no warning on AVX2
        monkeypatch.setattr(publish_module, "int8_isa", lambda: "avx512_vnni")
        create_predictor(str(tmp_path / "v"))  # VNNI runs the VNNI model as checked


def test_a_bad_target_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"target='avx512' is not valid: use one of \('auto', 'vnni', 'avx2', 'portable'\)"):
        export(tmp_path / "bad", target="avx512")
    assert os.listdir(tmp_path) == []


def test_a_plain_paddle_model_without_report_still_loads(tmp_path):
    net = nn.Sequential(nn.Linear(4, 2))
    with paddle.pir_utils.DygraphOldIrGuard():
        paddle.jit.save(net, str(tmp_path / "plain"), input_spec=[paddle.static.InputSpec([None, 4], "float32")])
    assert create_predictor(str(tmp_path / "plain"), int8=False) is not None


def test_interrupted_overwrite_leaves_no_model_that_looks_checked(tmp_path, monkeypatch):
    """Killed between the renames: new .pdmodel, old .pdiparams; the old report must not vouch for them."""
    prefix = tmp_path / "m"
    export(prefix, seed=0)
    real_replace, calls = os.replace, []

    def dies_after_the_first_model_file(src, dst):
        calls.append(os.path.basename(dst))
        if str(dst).endswith(".pdiparams"):  # m.pdmodel is in place already
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(publish_module.os, "replace", dies_after_the_first_model_file)
    with pytest.raises(KeyboardInterrupt):
        export(prefix, seed=1, overwrite=True, keep_float=["3"])
    monkeypatch.setattr(publish_module.os, "replace", real_replace)
    assert calls[-3:] == ["m.quant.json", "m.pdmodel", "m.pdiparams"]  # pending report, model, (killed)
    with open(str(prefix) + ".quant.json") as handle:
        assert json.load(handle)["state"] == "publishing"  # the old "checked" report is gone
    with pytest.raises(ExportIntegrityError, match="incomplete: its report .* publish was interrupted"):
        load_int8_predictor(str(prefix))


# ---------------------------------------------------------------------- a kill (SIGKILL) mid-publish
@pytest.fixture
def killed_export(tmp_path):
    """An export at tmp_path/m, then a second one with overwrite=True SIGKILLed between its renames."""
    prefix = tmp_path / "m"
    script = TINY_MODEL + textwrap.dedent(f"""
        import os, signal, sys
        import qtrainer.quant.export.files as publish
        from qtrainer.quant.export import export_quantized_model
        spec = [paddle.static.InputSpec([None, 1, 6, 6], "float32", "x")]
        export_quantized_model(tiny(0), {str(prefix)!r}, input_spec=spec, check=False)
        real = os.replace
        def replace(src, dst):
            if str(dst).endswith(".pdiparams"):  # the new m.pdmodel is in place, the old m.pdiparams too
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        publish.os.replace = replace
        export_quantized_model(tiny(1), {str(prefix)!r}, input_spec=spec, check=False, overwrite=True,
                               keep_float=["3"])
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    return prefix


def test_sigkilled_publish_is_refused_by_the_loader(killed_export):
    with pytest.raises(ExportIntegrityError, match="publish was interrupted"):
        create_predictor(str(killed_export))


def test_next_export_sweeps_the_staging_dir_of_the_killed_one(killed_export):
    directory = os.path.dirname(killed_export)
    assert len(staging_dirs(directory)) == 1  # left behind by the kill
    export(killed_export, seed=2, overwrite=True)
    assert staging_dirs(directory) == []
    assert load_int8_predictor(str(killed_export))[0] is not None


def test_staging_dir_of_a_live_export_is_kept(tmp_path):
    live = publish_module.make_staging_dir(str(tmp_path), "m")  # owned by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".m.123.abc.export-tmp"
    stale.mkdir()
    (stale / "owner.json").write_text(json.dumps({"host": __import__("socket").gethostname(),
                                                  "pid": int(dead.stdout)}))
    other_target = tmp_path / ".n.1.abc.export-tmp"  # another export's directory: not ours to judge
    other_target.mkdir()
    assert sweep_stale_staging(str(tmp_path), "m") == [str(stale)]
    assert os.path.isdir(live) and os.path.isdir(other_target)


# ---------------------------------------------------------------------- own export vs someone else's
def test_an_export_of_the_same_run_is_replaced_without_overwrite(tmp_path):
    export(tmp_path / "m", seed=0, run_id="run-a")
    report = export(tmp_path / "m", seed=1, run_id="run-a")
    assert report.written and report.run_id == "run-a"
    with open(tmp_path / "m.quant.json") as handle:
        assert json.load(handle)["run_id"] == "run-a"


def test_an_export_of_another_run_needs_overwrite(tmp_path):
    export(tmp_path / "m", seed=0, run_id="run-a")
    with pytest.raises(FileExistsError, match=r"written by another run \(run_id run-a\).*overwrite=True"):
        check_export_target(str(tmp_path / "m"), run_id="run-b")


def test_a_users_file_at_the_target_is_protected_from_any_run_id(tmp_path):
    (tmp_path / "m.pdmodel").write_bytes(b"the user's model")
    with pytest.raises(FileExistsError, match="not written by a qtrainer run with a run id"):
        check_export_target(str(tmp_path / "m"), run_id="run-a")
    with pytest.raises(FileExistsError):
        export(tmp_path / "m", run_id="run-a")
    assert (tmp_path / "m.pdmodel").read_bytes() == b"the user's model"


def test_dynamic_quantization_publishes_the_same_way(tmp_path):
    from qtrainer.quant.methods.dynamic import quantize_dygraph_weights

    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    for name, seed in (("a", 0), ("b", 1)):
        paddle.seed(seed)
        report = quantize_dygraph_weights(nn.Sequential(nn.Linear(8, 4)), str(tmp_path / name / "model"), spec)
    assert report["state"] == "complete" and sorted(report["sha256"]) == ["model.pdiparams", "model.pdmodel"]
    assert staging_dirs(tmp_path / "b") == []
    os.replace(tmp_path / "b" / "model.pdiparams", tmp_path / "a" / "model.pdiparams")
    with pytest.raises(ExportIntegrityError, match="does not match the export report"):
        create_predictor(str(tmp_path / "a" / "model"), int8=False)
