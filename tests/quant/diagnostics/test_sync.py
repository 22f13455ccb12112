"""Tests for qtrainer/quant/sync.py: ranks simulated in one process (the real 2-process runs are in
tests/test_distributed.py)."""
from __future__ import annotations

import copy
import threading

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant import quantize_model
from qtrainer.quant import AbsmaxCalibrator, HistCalibrator, KLCalibrator, MSECalibrator
from qtrainer.quant.observers.absmax import MovingAverageAbsMaxObserver
from qtrainer.quant.diagnostics.sync import QuantStateSync, reduce_calibration_stats, scale_spread_metrics
from qtrainer.quant.transforms.wrap import iter_quanted_layers


def _mlp() -> nn.Layer:
    paddle.seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _ranks(config=None, n: int = 2) -> list[nn.Layer]:
    """``n`` identical quantized models in training mode (one per simulated rank)."""
    model = _mlp()
    quantize_model(model, config)
    model.train()
    return [copy.deepcopy(model) for _ in range(n)]


def _f(tensor: paddle.Tensor) -> float:
    return float(tensor.numpy().reshape(-1)[0])


def _batch(seed: int, scale: float) -> paddle.Tensor:
    return paddle.to_tensor(np.random.RandomState(seed).normal(scale=scale, size=(4, 6)).astype("float32"))


def _sync_all(models: list[nn.Layer], mode: str = "auto") -> list[dict[str, float]]:
    """Run one QuantStateSync call on every simulated rank, all seeing the same gathered values."""
    values = [QuantStateSync(m, lambda a: a[None], mode=mode).local_values() for m in models]
    gathered = np.stack(values)
    return [QuantStateSync(m, lambda a: gathered, mode=mode)() for m in models]


def _quant_state(model: nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if "quanter" in k or "preprocess" in k}


def _act_observer(model: nn.Layer, index: int = 0):
    return list(iter_quanted_layers(model))[index][1].act_quanter.observer


def test_moving_average_scales_become_identical_and_equal_the_mean():
    models = _ranks()
    for rank, model in enumerate(models):
        model(_batch(rank, scale=1.0 + 3 * rank))
    before = [_f(_act_observer(m).accum) for m in models]
    assert abs(before[0] - before[1]) > 0.5  # the ranks saw different data

    _sync_all(models)

    after = [_quant_state(m) for m in models]
    assert after[0].keys() == after[1].keys()
    for key in after[0]:
        np.testing.assert_array_equal(after[0][key], after[1][key], err_msg=key)
    assert _f(_act_observer(models[0]).accum) == pytest.approx(np.mean(before), rel=1e-6)


def test_max_mode_makes_a_moving_average_equal_the_one_process_global_batch():
    models = _ranks(n=3)
    single = models.pop()
    for step in range(3):
        parts = [_batch(10 * step + rank, scale=1.0 + rank) for rank in range(2)]
        for model, part in zip(models, parts):
            model(part)
        single(paddle.concat(parts))
        _sync_all(models, mode="max")
    for model in models:
        for index in range(2):
            np.testing.assert_array_equal(_act_observer(model, index).accum.numpy(),
                                          _act_observer(single, index).accum.numpy())


def test_abs_max_activations_are_max_reduced_by_default_and_averaged_in_mean_mode():
    for mode, reduce in (("auto", max), ("mean", lambda a, b: (a + b) / 2)):
        models = _ranks({"activation_quantize_type": "abs_max"})
        for rank, model in enumerate(models):
            model(_batch(rank, scale=1.0 + rank))
        before = [_f(_act_observer(m).absmax) for m in models]
        _sync_all(models, mode)
        for model in models:
            assert _f(_act_observer(model).absmax) == pytest.approx(reduce(*before), rel=1e-6), mode


def test_pact_alpha_is_synchronised_during_its_data_driven_warm_up():
    models = _ranks({"activation_preprocess_type": "PACT", "pact_warmup_steps": 5})
    for rank, model in enumerate(models):
        model(_batch(rank, scale=1.0 + 2 * rank))
    pacts = [list(iter_quanted_layers(m))[0][1].act_preprocess for m in models]
    before = [_f(p.alpha) for p in pacts]
    assert before[0] != pytest.approx(before[1])
    _sync_all(models)
    assert _f(pacts[0].alpha) == _f(pacts[1].alpha) == pytest.approx(np.mean(before), rel=1e-6)
    # alpha stays what the synchronised observer says it is
    assert _f(pacts[0].alpha) == pytest.approx(_f(pacts[0].observer.scale()), rel=1e-6)


def test_weight_observers_are_left_out_unless_asked():
    model = _ranks(n=1)[0]
    default = QuantStateSync(model, lambda a: a[None]).keys
    assert default and not any("weight_quanter" in k for k in default)
    everything = QuantStateSync(model, lambda a: a[None], include_weight_observers=True).keys
    assert any("weight_quanter" in k for k in everything)


def test_the_spread_before_the_reduction_is_reported_in_scale_units():
    models = _ranks()
    for rank, model in enumerate(models):
        model(_batch(rank, scale=1.0 + rank))
    scales = [_f(_act_observer(m).scale()) for m in models]
    name = list(iter_quanted_layers(models[0]))[0][0]
    spreads = _sync_all(models)
    key = f"{name}.act_quanter.observer.scale"
    assert spreads[0][key] == pytest.approx(abs(scales[0] - scales[1]), rel=1e-5)
    assert spreads[0] == spreads[1]
    metrics = scale_spread_metrics(spreads[0])
    assert metrics[f"quant/scale_spread/{key}"] == spreads[0][key]
    assert metrics["quant/scale_spread/max"] == max(spreads[0].values())
    # a second reduction finds nothing left to reconcile
    assert max(_sync_all(models)[0].values()) == 0.0


def test_one_rank_is_left_unchanged():
    model = _ranks(n=1)[0]
    model(_batch(0, 1.0))
    before = _quant_state(model)
    QuantStateSync(model, lambda a: a[None])()
    after = _quant_state(model)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_bad_arguments_name_the_problem():
    model = _ranks(n=1)[0]
    with pytest.raises(ValueError, match="mode='median'.*auto, mean, max"):
        QuantStateSync(model, lambda a: a[None], mode="median")
    with pytest.raises(TypeError, match="all_gather must be callable"):
        QuantStateSync(model, all_gather=None)
    calibrated = nn.Sequential(nn.Linear(2, 2))
    calibrated.add_sublayer("hist", HistCalibrator())
    with pytest.raises(ValueError, match="reduce_calibration_stats"):
        QuantStateSync(calibrated, lambda a: a[None])


# ------------------------------------------------------------------------------- calibration
def _calibrators() -> dict[str, nn.Layer]:
    return {
        "absmax": AbsmaxCalibrator(),
        "hist": HistCalibrator(bins=64, upsample_bins=8, hist_percent=0.999),
        "kl": KLCalibrator(bins=256, upsample_bins=8),
        "mse": MSECalibrator(bins=64, upsample_bins=8),
        "moving": MovingAverageAbsMaxObserver(),
    }


def _thresholds(calibrators: dict[str, nn.Layer]) -> dict[str, float]:
    return {name: float(c.scale().numpy()[0]) for name, c in calibrators.items()}


class _ThreadGroup:
    """``all_reduce`` for ranks simulated by threads (a barrier per collective)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def all_reduce_for(self, rank: int):
        def all_reduce(array: np.ndarray, op: str) -> np.ndarray:
            self.slots[rank] = np.asarray(array)
            self.barrier.wait()
            stacked = np.stack(self.slots)
            self.barrier.wait()
            if op == "sum":
                return stacked.sum(axis=0)
            if op == "mean":
                return stacked.mean(axis=0)
            return stacked.max(axis=0) if op == "max" else stacked.min(axis=0)
        return all_reduce


def test_calibration_statistics_of_halves_give_the_thresholds_of_the_whole():
    rng = np.random.RandomState(0)
    # the second half has a much larger range, so the histograms must be regrouped before summing
    data = [np.abs(rng.standard_t(3, size=(64, 32))).astype("float32") * s for s in (1.0, 1.0, 9.0, 9.0)]
    whole = _calibrators()
    for batch in data:
        for calibrator in whole.values():
            calibrator(paddle.to_tensor(batch))
    expected = _thresholds(whole)

    ranks = [_calibrators() for _ in range(2)]
    for rank, calibrators in enumerate(ranks):
        for batch in data[2 * rank:2 * rank + 2]:  # rank 0: the small range, rank 1: the large one
            for calibrator in calibrators.values():
                calibrator(paddle.to_tensor(batch))
    for calibrators in ranks:  # a moving average depends on the order of batches: same start on both ranks
        calibrators["moving"] = copy.deepcopy(whole["moving"])
    group = _ThreadGroup(2)
    results: list = [None, None]
    errors: list = []

    def run(rank: int) -> None:
        try:
            results[rank] = reduce_calibration_stats(ranks[rank], group.all_reduce_for(rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert results[0] == results[1] and any(k.endswith("hist") for k in results[0])
    for calibrators in ranks:
        assert _thresholds(calibrators) == expected


def test_a_rank_that_saw_a_smaller_range_is_expanded_before_summing():
    small, large = HistCalibrator(bins=16, upsample_bins=4), HistCalibrator(bins=16, upsample_bins=4)
    small(paddle.to_tensor(np.array([0.1, 0.2], dtype="float32")))
    large(paddle.to_tensor(np.array([3.0, 5.0], dtype="float32")))
    group = _ThreadGroup(2)
    threads = [threading.Thread(target=reduce_calibration_stats, args=({"c": c}, group.all_reduce_for(r)))
               for r, c in enumerate((small, large))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    np.testing.assert_array_equal(small.hist.numpy(), large.hist.numpy())
    assert int(small.range_exp.numpy()[0]) == int(large.range_exp.numpy()[0]) == 3  # 5 < 2**3
    assert int(small.hist.numpy().sum()) == 4
