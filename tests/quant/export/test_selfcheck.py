"""selfcheck: per-sample comparison, top-1 judged only where the reference's top-1 is clear."""
from __future__ import annotations

import numpy as np
import pytest

from qtrainer.quant.export.selfcheck import compare_outputs, compare_samples, find_culprits, judge


def _clear_logits(n=20, classes=10, seed=0):
    """Logits with one class 5 above the others (a trained classifier's confident answers)."""
    rng = np.random.RandomState(seed)
    logits = rng.randn(n, classes) * 0.1
    logits[np.arange(n), rng.randint(0, classes, n)] += 5.0
    return logits.astype("float32")


def _tied_logits(n=20, classes=10, seed=0):
    """Near-identical scores on every row (an untrained network): ties broken by tiny noise."""
    rng = np.random.RandomState(seed)
    return (0.05 + 1e-5 * rng.randn(n, classes)).astype("float32")


def _result(deployed, reference, max_rel_l2=0.05, min_agreement=0.995):
    comparison = compare_samples([deployed], [reference], margin_rel_l2=max_rel_l2)
    return judge(comparison.samples, comparison.rel_l2, comparison.top1_agreement, {}, 0, min_agreement,
                 max_rel_l2, comparison=comparison), comparison


def test_near_tied_samples_are_judged_by_rel_l2_only():
    reference = _tied_logits(classes=1000)
    deployed = reference.copy()
    rows = np.arange(len(reference))
    order = np.argsort(reference, axis=-1)
    first, second = order[:, -1], order[:, -2]
    deployed[rows, first], deployed[rows, second] = reference[rows, second], reference[rows, first]
    result, comparison = _result(deployed, reference)
    assert comparison.top1_agreement_all == 0.0  # every top-1 changed: it measured the ties
    assert comparison.judged_samples == 0 and result.top1_agreement is None
    assert result.rel_l2 < 1e-4 and result.centered_rel_l2 < 0.05 and result.passed


def test_a_changed_clear_top1_fails():
    reference = _clear_logits(n=400)
    deployed = reference.copy()
    row = 3
    top = int(reference[row].argmax())
    deployed[row, top] -= 6.0  # one confident answer changed: that sample's error is far above tolerance
    result, comparison = _result(deployed, reference, max_rel_l2=0.1, min_agreement=0.999)
    assert result.rel_l2 < 0.1  # the aggregate error alone would pass
    assert comparison.judged_samples == len(reference)
    assert result.top1_agreement == pytest.approx(1 - 1 / len(reference))
    assert not result.passed and result.failures[0].startswith("top-1 agreement 99.7500% on 400 sample(s)")
    assert result.worst_samples[0]["index"] == row
    assert result.worst_samples[0]["top1_reference"] == top != result.worst_samples[0]["top1_deployed"]


def test_a_broken_deployment_fails_even_when_every_sample_is_tied():
    reference = _tied_logits()
    deployed = reference * 0.5  # e.g. weights deployed at half scale
    result, comparison = _result(deployed, reference)
    assert comparison.judged_samples == 0
    assert not result.passed and result.failures == [f"rel_l2 {result.rel_l2:.4g} > max_rel_l2 0.05"]


def test_per_sample_errors_and_quantiles_are_reported():
    reference = _clear_logits(n=50)
    deployed = reference.copy()
    deployed[17] *= 1.3  # one bad sample
    result, comparison = _result(deployed, reference, max_rel_l2=1.0, min_agreement=0.0)
    assert comparison.sample_rel_l2.shape == (50,)
    assert comparison.sample_rel_l2[17] == pytest.approx(0.3, rel=1e-5)
    assert [w["index"] for w in result.worst_samples][:1] == [17] and len(result.worst_samples) == 5
    assert result.sample_rel_l2_quantiles["max"] == pytest.approx(0.3, rel=1e-5)
    assert result.sample_rel_l2_quantiles["median"] == 0.0
    assert result.to_dict()["worst_samples"][0]["index"] == 17


def test_zero_tolerance_judges_every_sample_without_an_exact_tie():
    reference = _clear_logits()
    deployed = reference[:, ::-1].copy()
    comparison = compare_samples([deployed], [reference], margin_rel_l2=0.0)
    assert comparison.judged_samples == len(reference)
    assert comparison.top1_agreement == comparison.top1_agreement_all


def test_compare_outputs_gives_the_agreement_over_all_samples():
    reference = _tied_logits()
    deployed = reference[:, ::-1].copy()
    rel_l2, agreement = compare_outputs([deployed], [reference])
    assert agreement == float(np.mean(deployed.argmax(-1) == reference.argmax(-1)))
    assert rel_l2 > 0


def test_outputs_without_a_class_axis_have_no_agreement():
    reference = np.linspace(1, 2, 8).astype("float32").reshape(8, 1)
    comparison = compare_samples([reference * 1.01], [reference], margin_rel_l2=0.05)
    assert comparison.top1_agreement is None and comparison.judged_samples == 8
    assert comparison.rel_l2 == pytest.approx(0.01, rel=1e-4)


def test_all_zero_outputs_are_measured_against_a_floor():
    """An untrained MobileNetV1 at 224 px outputs exact zeros; its deployment float noise (1e-15)."""
    reference = np.zeros([16, 10], "float32")
    noise = (1e-15 * np.random.RandomState(0).randn(16, 10)).astype("float32")
    result, comparison = _result(noise, reference)
    assert comparison.zero_reference and comparison.judged_samples == 0
    assert result.rel_l2 < 1e-6 and result.passed
    broken, _ = _result(reference + 0.1, reference)  # a deployment that outputs something else
    assert not broken.passed


def test_find_culprits_bisects_to_the_responsible_layers():
    order = list("abcdefgh")
    culprits = {"c", "f"}
    calls = []

    def fails(floated):
        calls.append(floated)
        return bool(culprits - floated)

    floated, ok = find_culprits(order, fails, first_guess=["a"])
    assert ok and floated == culprits
    assert len(calls) <= 12  # a bisection, not one export per subset


def test_find_culprits_gives_up_when_float_does_not_help():
    floated, ok = find_culprits(list("abc"), lambda floated: True, first_guess=["a"])
    assert not ok and floated == {"a"}
