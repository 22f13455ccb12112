"""Self-check of an int8 export: the deployed model (Paddle Inference) against the dygraph model.

Pieces used by ``qtrainer.quant.export`` (and usable on their own):

* ``sample_batches(sample_inputs, input_spec)`` -- the batches to check on: the user's samples (a
  list of arrays, one array, or a loader), or random normal data shaped by ``input_spec``.
* ``dygraph_outputs(model, batches)`` -- the reference outputs.
* ``compare_outputs(deployed, reference)`` -- relative L2 error of all outputs and top-1 agreement
  of the first one (argmax over its last axis).
* ``CheckResult`` -- those numbers, the int8 op counts, the thresholds and the verdict.
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

from qtrainer.quant.samples import first_inputs

__all__ = [
    "CheckResult",
    "compare_outputs",
    "dygraph_outputs",
    "sample_batches",
    "spec_shapes",
    "find_culprits",
    "DEFAULT_RANDOM_BATCHES",
    "DEFAULT_LOADER_BATCHES",
]

logger = logging.getLogger(__name__)

DEFAULT_RANDOM_BATCHES = (4, 32)  # (batches, batch size) of random samples when only a spec is given
DEFAULT_LOADER_BATCHES = 8  # batches taken from a loader given as sample_inputs


@dataclass
class CheckResult:
    """The deployed model against a reference on the same samples.

    ``failures`` lists what misses the thresholds (empty = passed). Fewer int8 ops than layers
    exported as int8 (Paddle leaves an op in float, e.g. a convolution whose residual input has no
    scale) is a failure only with ``strict_int8``; otherwise it is listed in ``notes``.
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
        return (
            f"{self.samples} samples: rel_l2={self.rel_l2:.4g} top1_agreement={agree} "
            f"int8 ops {sum(self.int8_ops.values())}/{self.expected_int8_ops}"
            + ("" if self.passed else f" -- FAILED: {'; '.join(self.failures)}")
            + (f" (note: {'; '.join(self.notes)})" if self.notes else "")
        )


def compare_outputs(
    deployed: Sequence[np.ndarray], reference: Sequence[np.ndarray]
) -> tuple[float, float | None]:
    """``(relative L2 error over all outputs, top-1 agreement of the first output or None)``."""
    if len(deployed) != len(reference):
        raise ValueError(f"{len(deployed)} deployed output(s) vs {len(reference)} reference output(s)")
    diff = 0.0
    norm = 0.0
    for got, ref in zip(deployed, reference):
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"deployed output shape {got.shape} != reference shape {ref.shape}")
        diff += float(np.sum((got - ref) ** 2))
        norm += float(np.sum(ref**2))
    rel_l2 = float(np.sqrt(diff) / max(np.sqrt(norm), 1e-12))
    first_got, first_ref = np.asarray(deployed[0]), np.asarray(reference[0])
    if first_ref.ndim < 2 or first_ref.shape[-1] < 2:
        return rel_l2, None
    agreement = float(np.mean(first_got.argmax(-1) == first_ref.argmax(-1)))
    return rel_l2, agreement


def judge(
    samples: int,
    rel_l2: float,
    agreement: float | None,
    int8_ops: dict[str, int],
    expected_int8_ops: int,
    min_agreement: float,
    max_rel_l2: float,
    strict_int8: bool = False,
) -> CheckResult:
    """A ``CheckResult`` with its failures listed (empty list = passed)."""
    failures = []
    if not np.isfinite(rel_l2) or rel_l2 > max_rel_l2:
        failures.append(f"rel_l2 {rel_l2:.4g} > max_rel_l2 {max_rel_l2:g}")
    if agreement is not None and agreement < min_agreement:
        failures.append(f"top-1 agreement {agreement:.4%} < min_agreement {min_agreement:.2%}")
    numeric_failures = len(failures)
    notes = []
    total = sum(int8_ops.values())
    if total != expected_int8_ops:
        message = (
            f"Paddle Inference runs {total} compute op(s) in int8 ({dict(int8_ops)}) for "
            f"{expected_int8_ops} layer call(s) exported as int8; the others run in float"
        )
        (failures if strict_int8 else notes).append(message)
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
    )


# ---------------------------------------------------------------------- samples
def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    return np.asarray(value)


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, paddle.Tensor))


def spec_shapes(input_spec: Sequence[Any], batch: int) -> list[tuple[list[int], str]]:
    """``[(shape with unknown dims set to batch, numpy dtype name)]`` for each ``InputSpec``."""
    out = []
    for spec in input_spec:
        shape = [batch if (d is None or d < 0) else int(d) for d in spec.shape]
        dtype = str(spec.dtype).replace("paddle.", "")
        out.append((shape, dtype))
    return out


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
    first element of each batch is the input; up to ``max_loader_batches`` batches).
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
        arrays = first_inputs(sample_inputs, max_loader_batches)
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
