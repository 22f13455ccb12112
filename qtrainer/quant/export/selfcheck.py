"""Self-check of an int8 export: the deployed model (Paddle Inference) against the dygraph model.

Pieces used by ``qtrainer.quant.export`` (and usable on their own):

* ``sample_batches(sample_inputs, input_spec)`` -- the batches to check on: the user's samples (a
  list of arrays, one array, or a loader), or random normal data shaped by ``input_spec``.
* ``dygraph_outputs(model, batches)`` -- the reference outputs.
* ``compare_samples(deployed, reference, margin_rel_l2)`` -- relative L2 error of all outputs, per
  sample too (the worst samples), and top-1 agreement of the first output (argmax over its last
  axis) over the samples whose top-1 is clear: its margin over the second score exceeds what an
  error within the tolerance could flip. Near-tied scores (an untrained network, random inputs)
  are judged by the relative L2 error only. ``compare_outputs`` is the plain version.
* ``CheckResult`` -- those numbers, the int8 op counts, the thresholds, the verdict and the
  caveats (why the check proves little: random inputs, layers that saw only zeros, near ties).
* ``find_culprits(...)`` -- which layers to keep in float when the check fails: a first guess,
  then a bisection over the layers in forward order, within a time budget.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import paddle

from qtrainer.quant.export.samples import spec_shapes, spread_inputs

__all__ = [
    "CheckResult",
    "Comparison",
    "compare_outputs",
    "compare_samples",
    "dygraph_outputs",
    "sample_batches",
    "find_culprits",
    "DEFAULT_RANDOM_BATCHES",
    "DEFAULT_LOADER_BATCHES",
]

logger = logging.getLogger(__name__)

DEFAULT_RANDOM_BATCHES = (4, 32)  # (batches, batch size) of random samples when only a spec is given
DEFAULT_LOADER_BATCHES = 8  # batches drawn across a loader given as sample_inputs


@dataclass
class Comparison:
    """The deployed outputs against the reference, overall and per sample.

    ``top1_agreement`` counts only the *judged* samples: those whose reference top-1 margin (best
    minus second-best score of the first output) exceeds what an error within the tolerance could
    flip, ``sqrt(2) * margin_rel_l2 * |reference sample|``. On the others (near-tied scores, e.g.
    an untrained network) a different top-1 says nothing about the export; they are judged by the
    relative L2 error only. ``top1_agreement_all`` is the agreement over every sample.
    """

    samples: int
    rel_l2: float
    top1_agreement: float | None  # over the judged samples; None without a class axis or judged sample
    judged_samples: int
    top1_agreement_all: float | None
    sample_rel_l2: np.ndarray  # per sample, all outputs together
    worst_samples: list[dict[str, Any]]  # the largest per-sample errors, worst first
    zero_reference: bool = False  # the reference outputs are (nearly) all zero
    centered_rel_l2: float | None = None  # rel. L2 of the first output's scores minus each row's mean


#: Outputs whose RMS is below this are "zero": a relative error is measured against this floor
#: instead (an untrained MobileNetV1 at 224 px outputs exact zeros, deployed as 1e-15 noise).
ZERO_OUTPUT_RMS = 1e-6


@dataclass
class CheckResult:
    """The deployed model against a reference on the same samples.

    ``failures`` lists what misses the thresholds (empty = passed). Fewer int8 ops than layers
    exported as int8 (Paddle leaves an op in float, e.g. a convolution whose residual input has no
    scale) is a failure only with ``strict_int8``; otherwise it is listed in ``notes``.
    ``top1_agreement`` is over the ``judged_samples`` only (see ``Comparison``). ``caveats`` say
    why the check proves less than usual (random inputs, layers that saw only zeros, near-tied
    outputs); ``worst_samples`` are the check samples (index in the check batches) with the
    largest relative L2 error.
    """

    samples: int
    rel_l2: float
    top1_agreement: float | None  # None when the first output has no class axis
    int8_ops: dict[str, int] = field(default_factory=dict)
    expected_int8_ops: int = 0
    min_agreement: float = 0.0
    max_rel_l2: float = float("inf")
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    numeric_failures: int = 0
    judged_samples: int | None = None  # samples with a top-1 margin above the noise (None: all)
    centered_rel_l2: float | None = None  # first output's scores minus each row's mean (class outputs)
    top1_agreement_all: float | None = None
    sample_rel_l2_quantiles: dict[str, float] = field(default_factory=dict)
    worst_samples: list[dict[str, Any]] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    @property
    def numerics_ok(self) -> bool:
        """True when the outputs meet the thresholds (whatever the int8 op count)."""
        return self.numeric_failures == 0

    @property
    def int8_ok(self) -> bool:
        return sum(self.int8_ops.values()) == self.expected_int8_ops

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["int8_ops_total"] = sum(self.int8_ops.values())
        out["passed"] = self.passed
        return out

    def summary(self) -> str:
        agree = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.2%}"
        if self.judged_samples is not None and self.judged_samples != self.samples:
            agree += f" (on {self.judged_samples} sample(s) with a clear top-1)"
        worst = ""
        if self.worst_samples:
            w = self.worst_samples[0]
            worst = f" worst sample #{w['index']} rel_l2={w['rel_l2']:.4g}"
        return (
            f"{self.samples} samples: rel_l2={self.rel_l2:.4g} top1_agreement={agree}{worst} "
            f"int8 ops {sum(self.int8_ops.values())}/{self.expected_int8_ops}"
            + ("" if self.passed else f" -- FAILED: {'; '.join(self.failures)}")
            + (f" (note: {'; '.join(self.notes)})" if self.notes else "")
            + (f" (caveat: {'; '.join(self.caveats)})" if self.caveats else "")
        )


WORST_SAMPLES = 5  # per-sample errors listed in the report


def compare_outputs(
    deployed: Sequence[np.ndarray], reference: Sequence[np.ndarray]
) -> tuple[float, float | None]:
    """``(relative L2 error over all outputs, top-1 agreement of the first output or None)``."""
    result = compare_samples(deployed, reference, margin_rel_l2=0.0)
    return result.rel_l2, result.top1_agreement_all


def compare_samples(
    deployed: Sequence[np.ndarray], reference: Sequence[np.ndarray], margin_rel_l2: float
) -> Comparison:
    """Compare per sample; top-1 agreement over the samples whose margin exceeds ``margin_rel_l2``.

    A sample is judged on top-1 when ``margin > sqrt(2) * margin_rel_l2 * |reference sample|``:
    an error whose norm stays within ``margin_rel_l2`` of the sample's output cannot change its
    top-1 (two scores move apart by at most ``sqrt(2)`` times the error norm), so a changed top-1
    there means that sample's error exceeded the tolerance.
    """
    if len(deployed) != len(reference):
        raise ValueError(f"{len(deployed)} deployed output(s) vs {len(reference)} reference output(s)")
    diff = 0.0
    norm = 0.0
    samples = None
    per_diff = per_norm = None
    for got, ref in zip(deployed, reference):
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"deployed output shape {got.shape} != reference shape {ref.shape}")
        squares = (got - ref) ** 2
        diff += float(np.sum(squares))
        norm += float(np.sum(ref**2))
        if ref.ndim >= 1 and (samples is None or ref.shape[0] == samples):
            samples = ref.shape[0]
            d = squares.reshape(samples, -1).sum(1)
            n = (ref**2).reshape(samples, -1).sum(1)
            per_diff = d if per_diff is None else per_diff + d
            per_norm = n if per_norm is None else per_norm + n
    first_got = np.asarray(deployed[0], dtype=np.float64)
    first_ref = np.asarray(reference[0], dtype=np.float64)
    count = int(first_ref.shape[0]) if first_ref.ndim else 1
    size = sum(int(np.size(ref)) for ref in reference)
    floor = ZERO_OUTPUT_RMS * np.sqrt(max(size, 1))
    zero_reference = np.sqrt(norm) <= floor
    rel_l2 = float(np.sqrt(diff) / max(np.sqrt(norm), floor))
    if per_diff is None:
        sample_rel = np.asarray([rel_l2])
    else:
        sample_floor = ZERO_OUTPUT_RMS * np.sqrt(max(size // max(count, 1), 1))
        sample_rel = np.sqrt(per_diff) / np.maximum(np.sqrt(per_norm), sample_floor)
    classes = first_ref.ndim >= 2 and first_ref.shape[-1] >= 2
    agreement = agreement_all = centered = None
    judged = 0
    ref_top1 = got_top1 = margin = None
    if classes:
        ref_flat = first_ref.reshape(-1, first_ref.shape[-1])
        got_flat = first_got.reshape(-1, first_got.shape[-1])
        ref_top1, got_top1 = ref_flat.argmax(-1), got_flat.argmax(-1)
        same = ref_top1 == got_top1
        top2 = np.sort(ref_flat, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        # the noise allowed on a row: its share of the tolerance, from the row's own scores
        noise = np.sqrt(2.0) * margin_rel_l2 * np.linalg.norm(ref_flat, axis=-1)
        clear = (margin > noise) & (margin > ZERO_OUTPUT_RMS)
        # what top-1 depends on: the scores around each row's mean. A large common offset (near
        # ties: scores 1 + tiny differences) hides from the plain relative L2 an error in them.
        ref_c = ref_flat - ref_flat.mean(-1, keepdims=True)
        got_c = got_flat - got_flat.mean(-1, keepdims=True)
        c_floor = ZERO_OUTPUT_RMS * np.sqrt(ref_c.size)
        centered = float(np.linalg.norm(got_c - ref_c) / max(np.linalg.norm(ref_c), c_floor))
        judged = int(clear.sum())
        agreement_all = float(np.mean(same))
        agreement = float(np.mean(same[clear])) if judged else None
        if ref_flat.shape[0] != count:  # rows are not samples (e.g. a sequence output)
            ref_top1 = got_top1 = margin = None
    worst = []
    for index in np.argsort(-sample_rel, kind="stable")[:WORST_SAMPLES]:
        entry: dict[str, Any] = {"index": int(index), "rel_l2": float(sample_rel[index])}
        if ref_top1 is not None:
            entry.update(top1_reference=int(ref_top1[index]), top1_deployed=int(got_top1[index]),
                         margin=float(margin[index]))
        worst.append(entry)
    return Comparison(
        samples=count,
        rel_l2=rel_l2,
        top1_agreement=agreement,
        judged_samples=judged if classes else count,
        top1_agreement_all=agreement_all,
        sample_rel_l2=sample_rel,
        worst_samples=worst,
        zero_reference=bool(zero_reference),
        centered_rel_l2=centered,
    )


def judge(
    samples: int,
    rel_l2: float,
    agreement: float | None,
    int8_ops: dict[str, int],
    expected_int8_ops: int,
    min_agreement: float,
    max_rel_l2: float,
    strict_int8: bool = False,
    comparison: Comparison | None = None,
    caveats: Sequence[str] = (),
) -> CheckResult:
    """A ``CheckResult`` with its failures listed (empty list = passed).

    ``agreement`` is the top-1 agreement to hold to ``min_agreement`` (over the judged samples
    when ``comparison`` is given); ``comparison`` adds the per-sample details to the result.
    """
    failures = []
    if not np.isfinite(rel_l2) or rel_l2 > max_rel_l2:
        failures.append(f"rel_l2 {rel_l2:.4g} > max_rel_l2 {max_rel_l2:g}")
    centered = None if comparison is None else comparison.centered_rel_l2
    if centered is not None and not failures and (not np.isfinite(centered) or centered > max_rel_l2):
        failures.append(
            f"rel_l2 of the scores around each sample's mean (what top-1 depends on) {centered:.4g} "
            f"> max_rel_l2 {max_rel_l2:g}"
        )
    if agreement is not None and agreement < min_agreement:
        judged = "" if comparison is None else f" on {comparison.judged_samples} sample(s) with a clear top-1"
        failures.append(f"top-1 agreement {agreement:.4%}{judged} < min_agreement {min_agreement:.2%}")
    numeric_failures = len(failures)
    notes = []
    total = sum(int8_ops.values())
    if total != expected_int8_ops:
        message = (
            f"Paddle Inference runs {total} compute op(s) in int8 ({dict(int8_ops)}) for "
            f"{expected_int8_ops} layer call(s) exported as int8; the others run in float"
        )
        (failures if strict_int8 else notes).append(message)
    extra: dict[str, Any] = {}
    if comparison is not None:
        quantiles = np.quantile(comparison.sample_rel_l2, [0.5, 0.99, 1.0])
        extra = dict(
            judged_samples=comparison.judged_samples,
            centered_rel_l2=comparison.centered_rel_l2,
            top1_agreement_all=comparison.top1_agreement_all,
            sample_rel_l2_quantiles={"median": float(quantiles[0]), "p99": float(quantiles[1]),
                                     "max": float(quantiles[2])},
            worst_samples=list(comparison.worst_samples),
        )
    return CheckResult(
        samples=samples,
        rel_l2=rel_l2,
        top1_agreement=agreement,
        int8_ops=dict(int8_ops),
        expected_int8_ops=expected_int8_ops,
        min_agreement=min_agreement,
        max_rel_l2=max_rel_l2,
        failures=failures,
        notes=notes,
        numeric_failures=numeric_failures,
        caveats=list(caveats),
        **extra,
    )


# ---------------------------------------------------------------------- samples
def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    return np.asarray(value)


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, paddle.Tensor))


def _random_batches(
    input_spec: Sequence[Any], batches: int, batch_size: int, seed: int
) -> list[list[np.ndarray]]:
    rng = np.random.RandomState(seed)
    result = []
    for _ in range(batches):
        batch = []
        for shape, dtype in spec_shapes(input_spec, batch_size):
            if np.issubdtype(np.dtype(dtype), np.floating):
                batch.append(rng.standard_normal(shape).astype(dtype))
            else:
                batch.append(rng.randint(0, 2, size=shape).astype(dtype))
        result.append(batch)
    return result


def sample_batches(
    sample_inputs: Any,
    input_spec: Sequence[Any] | None,
    max_loader_batches: int = DEFAULT_LOADER_BATCHES,
    seed: int = 0,
) -> tuple[list[list[np.ndarray]], str]:
    """The check batches (each a list with one array per model input) and where they came from.

    ``sample_inputs``: ``None`` (random normal data shaped by ``input_spec``), one array or
    Tensor (one batch), a list/tuple of them (batches; an element may itself be a tuple of arrays
    for a model with several inputs), or any other iterable of batches such as a DataLoader (the
    first element of each batch is the input; up to ``max_loader_batches`` batches' worth of
    samples drawn evenly across it, ``samples.spread_inputs``).
    """
    if sample_inputs is None:
        if not input_spec:
            raise ValueError(
                "the export needs sample_inputs (real batches, best) or an input_spec (random samples)"
            )
        batches, size = DEFAULT_RANDOM_BATCHES
        logger.warning(
            "export: no sample_inputs, using random inputs (%d x %d, from input_spec) for the "
            "self-check and to tell signed from unsigned layer inputs; real batches are far better",
            batches,
            size,
        )
        return _random_batches(input_spec, batches, size, seed), "random"
    if _is_array(sample_inputs):
        return [[_to_numpy(sample_inputs)]], "given"
    if isinstance(sample_inputs, (list, tuple)):
        if not sample_inputs:
            raise ValueError("sample_inputs is an empty list; give at least one batch")
        batches = []
        for index, item in enumerate(sample_inputs):
            if _is_array(item):
                batches.append([_to_numpy(item)])
            elif isinstance(item, (list, tuple)) and item and all(_is_array(i) for i in item):
                batches.append([_to_numpy(i) for i in item])
            else:
                raise TypeError(
                    f"sample_inputs[{index}] is a {type(item).__name__}; each element must be a "
                    "numpy array or paddle Tensor (one batch), or a tuple of them (one per input)"
                )
        return batches, "given"
    if isinstance(sample_inputs, Iterable):
        arrays = spread_inputs(sample_inputs, max_loader_batches)
        if not arrays:
            raise ValueError("sample_inputs is a loader that yielded no batch")
        return [[a] for a in arrays], "loader"
    raise TypeError(
        f"sample_inputs must be None, an array, a list of arrays or a loader; got "
        f"{type(sample_inputs).__name__}"
    )


def dygraph_outputs(model: paddle.nn.Layer, batches: Iterable[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The model's outputs (each concatenated over the batches), computed without gradient."""
    per_output: list[list[np.ndarray]] = []
    with paddle.no_grad():
        for batch in batches:
            out = model(*[paddle.to_tensor(a) for a in batch])
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            if not per_output:
                per_output = [[] for _ in outs]
            for store, value in zip(per_output, outs):
                store.append(value.numpy())
    return [np.concatenate(store) if store[0].ndim else np.stack(store) for store in per_output]


# ---------------------------------------------------------------------- culprit search
def find_culprits(
    order: Sequence[str],
    fails: Callable[[frozenset[str]], bool],
    base: Iterable[str] = (),
    first_guess: Iterable[str] = (),
    deadline: float | None = None,
) -> tuple[frozenset[str], bool]:
    """Layers to deploy in float so that ``fails(float_set)`` becomes False.

    ``order`` is every candidate in forward order; ``fails(s)`` exports with the layers of ``s`` in
    float (computing their simulated values) and returns True while the deployed model misses the
    thresholds. ``base`` is always float. The first guess is tried first and kept if it is enough.
    Then, unless the check fails even with every candidate in float (the int8 kernels are not the
    cause; the first guess is returned), layer after layer a bisection over prefixes of the
    remaining int8 layers finds the first one whose int8 deployment makes the check fail, and
    adds it to the float set. Returns ``(float set, passed)``; stops at ``deadline`` (a
    ``time.monotonic()`` value) with the set found so far.
    """
    floated = frozenset(base)
    guess = frozenset(first_guess) - floated
    if not fails(floated):
        return floated, True
    if guess and not _late(deadline):
        if not fails(floated | guess):
            return floated | guess, True
    if _late(deadline) or fails(floated | frozenset(order)):
        # Even with every candidate in float the check fails, so the int8 kernels are not the cause
        # (e.g. a model so sensitive that float rounding differences flip its fake-quant rounding);
        # a search cannot help: keep the first guess only.
        logger.warning("self-check: the disagreement remains with every layer in float; no search")
        return floated | guess, False
    while not _late(deadline):
        remaining = [name for name in order if name not in floated]
        if not remaining:
            return floated, not fails(floated)
        # invariant: int8 on remaining[:hi] fails; int8 on remaining[:lo] passes (lo=0: all float)
        lo, hi = 0, len(remaining)
        while hi - lo > 1 and not _late(deadline):
            mid = (lo + hi) // 2
            if fails(floated | frozenset(remaining[mid:])):
                hi = mid
            else:
                lo = mid
        if hi - lo > 1:  # out of time mid-bisection
            break
        floated = floated | {remaining[hi - 1]}
        logger.info("self-check: %s makes the int8 model disagree; keeping it in float", remaining[hi - 1])
        if not fails(floated):
            return floated, True
    logger.warning("self-check: culprit search stopped by its time limit")
    return floated, False


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def judge_runtime(runtime: str, deployed: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                  int8_found: int, expected_int8_ops: int | None, float_nodes: str,
                  max_rel_l2: float, min_agreement: float) -> CheckResult:
    """The self-check's verdict on another runtime's outputs (OpenVINO, onnxruntime).

    ``int8_found`` compute nodes ran int8 there; fewer than ``expected_int8_ops`` (the export's
    int8 layer calls) is a note naming ``float_nodes``, not a failure.
    """
    comparison = compare_samples(deployed, reference, margin_rel_l2=max_rel_l2)
    result = judge(comparison.samples, comparison.rel_l2, comparison.top1_agreement, {"int8_compute": int8_found},
                   int8_found, min_agreement, max_rel_l2, comparison=comparison)
    expected = int8_found if expected_int8_ops is None else expected_int8_ops
    result.expected_int8_ops = expected
    if int8_found != expected:
        result.notes.append(
            f"{runtime} runs {int8_found} compute node(s) in int8 for {expected} layer call(s) exported as "
            f"int8; float: {float_nodes or 'none'}"
        )
    return result
