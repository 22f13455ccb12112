"""qtrainer/strategies.py: the one-process and data-parallel strategies, choosing one, agreeing on batches.

The 2-process runs (a ``paddle.distributed.spawn`` group, the ``group`` fixture in conftest.py)
check what DDP training must keep equal across ranks: gradients under accumulation, the stop
decision, exact resume, and the quantization state (scales, PACT alpha, calibration thresholds).
"""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from qtrainer import Trainer
from qtrainer.strategies import DDPStrategy, SingleProcess, agree_on_batches, resolve_strategy

from distributed_jobs import (
    N_TRAIN,
    Points,
    assert_close,
    calibration_batches,
    load_dump,
    new_net,
    ptq_callback,
    quiet,
    reference_fit,
    thresholds,
    val_loader,
    weights,
)


def quant_state(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if "quanter" in k or "preprocess" in k}


@pytest.mark.slow
def test_ranks_hold_identical_quant_scales_after_qat_steps(group):
    _, rank0 = load_dump(group / "qat_sync.rank0.npz")
    _, rank1 = load_dump(group / "qat_sync.rank1.npz")
    state0, state1 = quant_state(rank0), quant_state(rank1)
    assert any(k.endswith("act_quanter.observer.accum") for k in state0)
    assert_close(state0, state1, atol=0)
    assert_close(rank0, rank1, atol=0)


@pytest.mark.slow
def test_without_the_sync_the_ranks_scales_differ(group):
    _, rank0 = load_dump(group / "qat_nosync.rank0.npz")
    _, rank1 = load_dump(group / "qat_nosync.rank1.npz")
    accum = [k for k in rank0 if k.endswith("act_quanter.observer.accum")]
    assert accum and max(float(np.abs(rank0[k] - rank1[k]).max()) for k in accum) > 1e-3


@pytest.mark.slow
def test_pact_alpha_is_identical_on_every_rank_through_and_after_its_warm_up(group):
    facts, rank0 = load_dump(group / "qat_pact.rank0.npz")
    _, rank1 = load_dump(group / "qat_pact.rank1.npz")
    alphas = [k for k in rank0 if k.endswith("act_preprocess.alpha")]
    assert alphas and facts["step"] > 4  # trained past the 4-step warm-up
    assert_close(quant_state(rank0), quant_state(rank1), atol=0)


@pytest.mark.slow
def test_the_pre_sync_spread_of_scales_is_logged(group):
    [csv] = (group / "root" / "qat_csv").rglob("metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    spread = [c for c in header if c.startswith("quant/scale_spread/")]
    assert "quant/scale_spread/max" in spread and any(c.endswith("act_quanter.observer.scale") for c in spread)


@pytest.mark.slow
def test_two_rank_ptq_callback_thresholds_equal_one_rank_thresholds(group, tmp_path):
    module = new_net()
    Trainer(**quiet(tmp_path)).fit(module, paddle.io.DataLoader(Points(N_TRAIN), batch_size=8), val_loader(),
                                  callbacks=[ptq_callback()])
    expected = thresholds(module)
    assert len(expected) == 2
    for rank in range(2):
        assert json.loads((group / f"ptq_callback.rank{rank}.json").read_text()) == expected


@pytest.mark.slow
def test_two_rank_calibrator_thresholds_equal_one_rank_thresholds(group):
    from qtrainer.quant import AbsmaxCalibrator, HistCalibrator, KLCalibrator, MSECalibrator

    whole = {"absmax": AbsmaxCalibrator(), "hist": HistCalibrator(bins=128, upsample_bins=8),
             "kl": KLCalibrator(bins=256, upsample_bins=8), "mse": MSECalibrator(bins=128, upsample_bins=8)}
    for batch in calibration_batches():
        for calibrator in whole.values():
            calibrator(paddle.to_tensor(batch))
    expected = {name: float(c.scale().numpy()[0]) for name, c in whole.items()}
    for rank in range(2):
        assert json.loads((group / f"ptq.rank{rank}.json").read_text()) == expected


@pytest.mark.slow
def test_gradient_accumulation_on_two_ranks_equals_one_rank(group, tmp_path):
    reference, _ = reference_fit(tmp_path, accumulate_grad_batches=2)
    _, rank0 = load_dump(group / "accumulate.rank0.npz")
    _, rank1 = load_dump(group / "accumulate.rank1.npz")
    assert_close(rank0, rank1, atol=0)
    assert_close(rank0, weights(reference), atol=2e-6)


class _RecordingStrategy(SingleProcess):
    def __init__(self) -> None:
        self.flags: list[bool] = []

    def training_step(self, model, batch, batch_idx, sync_gradients=True):
        self.flags.append(sync_gradients)
        return super().training_step(model, batch, batch_idx, sync_gradients)


def test_accumulation_micro_batches_skip_the_gradient_reduction(tmp_path):
    strategy = _RecordingStrategy()
    trainer = Trainer(**quiet(tmp_path, max_epochs=1, accumulate_grad_batches=3, strategy=strategy))
    trainer.fit(new_net(), paddle.io.DataLoader(Points(28), batch_size=4))  # 7 batches: 3 + 3 + 1
    assert strategy.flags == [False, False, True, False, False, True, True]


@pytest.mark.slow
def test_a_stop_requested_by_one_rank_stops_all(group):
    for rank in range(2):
        facts, _ = load_dump(group / f"stop.rank{rank}.npz")
        assert facts["epoch"] == 1


@pytest.mark.slow
def test_resume_on_two_ranks_continues_exactly(group):
    full, full_weights = load_dump(group / "resume_full.rank0.npz")
    part, _ = load_dump(group / "resume_part.rank0.npz")
    assert part["step"] == 5 and part["epoch"] == 0  # stopped mid-epoch (6 steps per epoch)
    for rank in range(2):
        rest, rest_weights = load_dump(group / f"resume_rest.rank{rank}.npz")
        assert_close(rest_weights, full_weights, atol=1e-6)
        assert rest["step"] == full["step"]
        val = lambda history: [(r["step"], r.get("val_loss"), r.get("train_loss_epoch")) for r in history]  # noqa: E731
        assert val(rest["history"]) == pytest.approx(val(full["history"]))


class _TwoRanks:
    """A strategy stub whose all_gather returns what two ranks would report."""

    world_size, is_global_zero = 2, True

    def __init__(self, counts):
        self.counts = counts

    def all_gather(self, array):
        return np.array([[c] for c in self.counts], dtype=np.float64)


def test_agree_on_batches_refuses_a_rank_without_batches():
    with pytest.raises(ValueError, match=r"rank 0: 1, rank 1: 0.*more processes than the data has batches"):
        agree_on_batches(_TwoRanks([1, 0]), "train", 1)
    assert agree_on_batches(_TwoRanks([3, 2]), "train", 3) == 2  # ranks step together


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="fsdp"), r"strategy='fsdp'\) is not supported; use one of: 'auto', 'ddp', 'single_device'"),
    (dict(strategy="ddp", devices=64), r"devices=64 processes do not fit this machine: it has \d+ CPU core.*available: 1\.\.\d+"),
    (dict(devices=0), r"devices=0.*positive int"),
    (dict(devices="two"), r"devices='two'.*positive int"),
    (dict(strategy="single_device", devices=2), r"single_device.*strategy='ddp'"),
    (dict(strategy=object()), r"got a object.*DDPStrategy"),
])
def test_strategy_and_devices_that_do_not_fit_are_refused(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Trainer(**quiet(tmp_path, **kwargs))


def test_gpu_devices_on_a_machine_without_gpus_list_what_is_available():
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match="no GPU.*available here: auto, cpu"):
        Trainer(device="gpu", strategy="ddp", devices=2)


def test_devices_must_match_what_the_launcher_started(monkeypatch):
    for name, value in {"PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "4", "PADDLE_LOCAL_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"devices=3 but paddle.distributed.launch started 2 process\(es\) on this node"):
        resolve_strategy("ddp", 3, "cpu")
    strategy = resolve_strategy("auto", "auto", "cpu")
    assert isinstance(strategy, DDPStrategy) and strategy.world_size == 4 and strategy.local_world_size == 2
    with pytest.raises(ValueError, match="independent copies"):
        resolve_strategy("single_device", "auto", "cpu")


def test_one_process_strategies_reduce_nothing():
    for strategy in (SingleProcess(), resolve_strategy("ddp", "auto", "cpu")):
        array = np.array([1.0, 2.0])
        np.testing.assert_array_equal(strategy.all_reduce(array, "mean"), array)
        np.testing.assert_array_equal(strategy.all_gather(array), array[None])
        assert strategy.broadcast_object({"a": 1}) == {"a": 1} and strategy.reduce_boolean_decision(True)
        assert not strategy.needs_spawn and strategy.world_size == 1
        with pytest.raises(ValueError, match="op='avg'.*sum, mean, max, min"):
            strategy.all_reduce(array, "avg")


class _FakeRanks(SingleProcess):
    world_size = 2

    def __init__(self, counts):
        self.counts = counts

    def all_gather(self, array):
        return np.array([[c] for c in self.counts], dtype=np.float64)


def test_ranks_agree_on_the_number_of_training_batches():
    assert agree_on_batches(_FakeRanks([3, 3]), "train", 3) == 3
    assert agree_on_batches(_FakeRanks([3, 2]), "train", 3) == 2      # all ranks step together
    assert agree_on_batches(_FakeRanks([3, 2]), "validation", 3) == 3  # evaluation may differ
    with pytest.raises(ValueError, match=r"1 of the 2 processes no batch \(validation batches per rank: rank 0: 1, "
                                         r"rank 1: 0\).*more processes"):
        agree_on_batches(_FakeRanks([1, 0]), "validation", 1)
    assert agree_on_batches(_FakeRanks([0, 0]), "validation", 0) == 0  # no validation data anywhere
    with pytest.raises(ValueError, match="2 of the 2 processes no batch"):
        agree_on_batches(_FakeRanks([0, 0]), "train", 0)


def test_ddp_looks_for_unused_parameters_when_asked_or_when_a_layer_declares_it():
    from paddle import nn

    from qtrainer.strategies import DDPStrategy

    class MayLeaveUnused(nn.Layer):
        may_leave_parameters_unused = True

    plain = nn.Sequential(nn.Linear(2, 2))
    declaring = nn.Sequential(nn.Linear(2, 2), MayLeaveUnused())
    assert DDPStrategy().finds_unused_parameters(plain) is False
    assert DDPStrategy().finds_unused_parameters(declaring) is True
    assert DDPStrategy(find_unused_parameters=True).finds_unused_parameters(plain) is True
