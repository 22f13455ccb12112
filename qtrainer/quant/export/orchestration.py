"""Export a quantized model (QAT or PTQ) to a Paddle Inference model that runs int8 on CPU.

``export_quantized_model(model, path, input_spec, sample_inputs)`` writes ``path.pdmodel`` +
``path.pdiparams`` (a legacy Paddle inference model that ``qtrainer.quant.export.inference``
runs with oneDNN int8 kernels) and ``path.quant.json`` (per layer: bits, scales, how it was
exported and why; the self-check; the int8 op counts), and returns the same as an
``ExportReport``. The user's model is not touched (the export works on a deep copy in eval mode).

The steps: check the options and the target (``files``), take the samples and the spec
(``samples``), plan every layer (``plan``), then build, trace and check attempts (``_Exporter``:
``layers`` + ``program`` traced by ``paddle.jit.save``, run by ``inference``, judged by
``selfcheck``) until the deployed model agrees with the simulation, and publish the chosen one
(``files``). The format, the self-check and the measurements behind each rule:
``docs/export-format.md``.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.export.files import check_export_target, make_export_staging, publish_export, remove_empty
from qtrainer.quant.export.inference import load_int8_predictor, read_program_ops, run_predictor
from qtrainer.quant.export.layers import FAKE_QUANT_TYPES, INT8_TYPES, Int8Conv2D
from qtrainer.quant.export.accuracy_fallback import check_max_drop, export_within_drop
from qtrainer.quant.export.isa import resolve_target
from qtrainer.quant.export.bias_grid import ALIGN_BIASES, align_biases
from qtrainer.quant.export.plan import mark_fallback, matches, observe_layers, plan_layers, working_copy
from qtrainer.quant.export.program import fused_unsigned_inputs, norms_after_convs, residual_conv_weights
from qtrainer.quant.export.report import ExportCheckError, ExportReport, LayerExport
from qtrainer.quant.export.samples import check_batches_match, dry_run, normalise_spec, spec_dict
from qtrainer.quant.export.speed import measure_speed, slow_int8_warning
from qtrainer.quant.export.selfcheck import CheckResult, compare_samples, find_culprits, judge, sample_batches
from qtrainer.quant.transforms.fuse import FOLDABLE_NORMS
from qtrainer.quant.transforms.wrap import QuantedLayer, iter_quanted_layers

__all__ = ["export_quantized_model", "ExportOptions", "CheckOptions"]

logger = logging.getLogger(__name__)

_ON_FAILURE = ("raise", "write")
#: What the export can write: the Paddle Inference model (always, the others are made from it),
#: the OpenVINO IR (``qtrainer.quant.export.openvino``, the ``qtrainer[openvino]`` extra) and an
#: ONNX QDQ model (``qtrainer.quant.export.onnx``, the ``qtrainer[onnx]`` extra).
EXPORT_FORMATS = ("paddle", "openvino", "onnx")
_CLIP_CHOICES = ("auto", True, False)


@dataclass(frozen=True)
class CheckOptions:
    """How the deployed model is judged against the simulation (see ``export_quantized_model``)."""

    check: bool = True
    min_agreement: float = 0.995
    max_rel_l2: float = 0.05
    fallback: bool = True
    search_time_limit: float = 300.0
    on_failure: str = "raise"
    strict_int8: bool = False
    num_threads: int = 1
    measure_speed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.measure_speed, bool):
            raise ValueError(f"measure_speed={self.measure_speed!r} must be True or False")
        if not (isinstance(self.min_agreement, (int, float)) and 0.0 <= self.min_agreement <= 1.0):
            raise ValueError(f"min_agreement={self.min_agreement!r} must be a number in [0, 1]")
        if not (isinstance(self.max_rel_l2, (int, float)) and self.max_rel_l2 >= 0.0):
            raise ValueError(f"max_rel_l2={self.max_rel_l2!r} must be a number >= 0")
        if self.on_failure not in _ON_FAILURE:
            raise ValueError(f"on_failure={self.on_failure!r} is not valid: use one of {_ON_FAILURE}")
        if not (isinstance(self.search_time_limit, (int, float)) and self.search_time_limit >= 0):
            raise ValueError(f"search_time_limit={self.search_time_limit!r} must be a number of seconds >= 0")


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``export_quantized_model`` takes besides the model and its inputs, grouped."""

    check: CheckOptions = field(default_factory=CheckOptions)
    overwrite: bool = False
    run_id: str | None = None
    keep_float: Sequence[str] = ()
    fake_quant_layers: Sequence[str] = ()
    clip_activations: bool | str = "auto"
    formats: Sequence[str] = ("paddle",)
    target: str = "portable"
    align_biases: bool | str = "auto"
    accuracy: dict | None = None  # the accuracy-aware fallback's record, for the report (accuracy_fallback)

    def __post_init__(self) -> None:
        resolve_target(self.target)  # an unknown target (or 'auto' on a CPU without AVX2) fails first
        formats = self.formats
        if isinstance(formats, str) or not isinstance(formats, (list, tuple)) or not all(
            isinstance(f, str) for f in formats
        ):
            raise TypeError(f"formats={formats!r} must be a tuple of format names from {EXPORT_FORMATS}")
        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if unknown or "paddle" not in formats:
            raise ValueError(
                f"formats={tuple(formats)!r} is not valid: accepted names are {EXPORT_FORMATS}, and "
                "'paddle' must be among them (the other formats are converted from the Paddle model)"
            )
        if "openvino" in formats:  # the extras are checked before the work, not after it
            from qtrainer.quant.export.onnx import require_onnx, require_onnxruntime
            from qtrainer.quant.export.openvino import require_openvino

            require_openvino(), require_onnx(), require_onnxruntime()  # the IR is converted from our ONNX
        if "onnx" in formats:
            from qtrainer.quant.export.onnx import require_onnx, require_onnxruntime

            require_onnx(), require_onnxruntime()
        if not (isinstance(self.align_biases, bool) or self.align_biases == "auto"):
            raise ValueError(f"align_biases={self.align_biases!r} is not valid: use one of {ALIGN_BIASES}")
        if self.align_biases is True and "onnx" not in formats:
            raise ValueError("align_biases=True puts biases on onnxruntime's int32 grid: it needs 'onnx' in formats")
        if not (isinstance(self.clip_activations, bool) or self.clip_activations == "auto"):
            raise ValueError(f"clip_activations={self.clip_activations!r} is not valid: use one of {_CLIP_CHOICES}")
        for argument in ("keep_float", "fake_quant_layers"):
            patterns = getattr(self, argument)
            if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not all(
                isinstance(p, str) for p in patterns
            ):
                raise TypeError(f"{argument}={patterns!r} must be a list of layer names or fnmatch patterns")


def export_quantized_model(
    model: nn.Layer,
    path: str,
    input_spec: Sequence[Any] | None = None,
    sample_inputs: Any = None,
    check: bool = True,
    min_agreement: float = 0.995,
    max_rel_l2: float = 0.05,
    fallback: bool = True,
    search_time_limit: float = 300.0,
    on_failure: str = "raise",
    overwrite: bool = False,
    run_id: str | None = None,
    keep_float: Sequence[str] = (),
    fake_quant_layers: Sequence[str] = (),
    clip_activations: bool | str = "auto",
    strict_int8: bool = False,
    num_threads: int = 1,
    formats: Sequence[str] = ("paddle",),
    measure_speed: bool = True,
    target: str = "portable",
    max_drop: float | None = None,
    align_biases: bool | str = "auto",
    eval_loader: Any = None,
    metric: Any = None,
    metric_mode: str = "max",
    eval_batches: int | None = None,
) -> ExportReport:
    """Export a quantized ``model`` for Paddle Inference int8 on CPU and check it; see the module docstring.

    Args:
        model: a model with quantized layers (``QAT.quantize`` / PTQ); it is not modified, except by
            ``align_biases``.
        path: file prefix (``path.pdmodel``, ``path.pdiparams``, ``path.quant.json``).
        input_spec: ``paddle.static.InputSpec`` list (default: from the first sample batch with a
            free batch dimension).
        sample_inputs: batches for the self-check and for deciding which layer inputs are
            unsigned: a numpy array / Tensor, a list of them, or a loader (first element of each
            batch, up to 8 batches). Default: random normal data shaped by ``input_spec`` (all
            first-layer inputs then look signed; real batches are much better).
        check: run the self-check.
        min_agreement, max_rel_l2: the self-check's thresholds (top-1 agreement of the first
            output and relative L2 error of all outputs, deployed vs dygraph).
        fallback: when the check fails, find the responsible layers and keep them in float.
        search_time_limit: seconds the fallback search may take.
        on_failure: ``'raise'`` (raise ``ExportCheckError``, write nothing) or ``'write'`` (write
            the model and a report saying the check failed).
        overwrite: replace an existing export at ``path``.
        run_id: an identifier of the run writing the export, recorded in the JSON; an existing
            export recorded with the same ``run_id`` (this run's own, e.g. before a resume) is
            replaced without ``overwrite`` (see ``check_export_target``).
        keep_float: names or ``fnmatch`` patterns of quantized layers to export as their float
            layer (not quantized at all).
        fake_quant_layers: names or patterns of layers to export as ``'fake-quant'`` from the
            start (float kernels computing the simulated values), e.g. a first convolution on a
            signed input on a CPU without VNNI.
        clip_activations: add an explicit clip to ``[-T, T]`` before the quantization:
            ``'auto'`` (layers with fewer than 8 activation bits, and those whose sample inputs
            lie beyond ``T`` where the deployed grid would not clip them, in at least
            ``plan.CLIP_FRACTION`` of their values: calibrators that clip on purpose), ``True``
            (every int8 layer; exact clipping, one more op each) or ``False``.
        strict_int8: fail the check when Paddle runs fewer int8 ops than layers exported as int8
            (default: a note in the report and a warning).
        num_threads: CPU threads of the checking predictor.
        measure_speed: time the exported int8 model against the same model in float on this
            machine (Paddle Inference, batch 1, ``num_threads``; about a second) and warn, naming
            the layers that keep it from running int8 end to end, when int8 is not faster. The
            figures go into the report (``speed``).
        formats: what to write besides ``path.quant.json``: ``'paddle'`` (always) and
            ``'openvino'`` (``path.xml`` + ``path.bin``, OpenVINO IR converted from the same ONNX QDQ
            model as ``'onnx'``, int8 weights kept int8; the self-check also runs it on OpenVINO's CPU plugin
            and records its agreement and the precision each convolution runs in; the
            ``qtrainer[openvino]`` extra) and ``'onnx'`` (``path.onnx``, an ONNX QDQ model of the
            same int8 program, opset 13, checked on onnxruntime like the Paddle model, with the
            count of its int8 kernels; the ``qtrainer[onnx]`` extra).
        target: the CPUs the model is for (``qtrainer.quant.export.isa``): ``'portable'`` (default)
            or ``'avx2'`` (the u8 headroom CPUs without VNNI need: the simulation's own grid, correct
            on every x86-64 CPU with AVX2), ``'vnni'`` (AVX-512 VNNI, AVX-VNNI or AMX: unsigned
            activations on the full u8 grid, finer than the simulation's; lets onnxruntime fuse
            relu6; wrong on CPUs without VNNI) or ``'auto'`` (this CPU's kind). The self-check runs
            on this CPU; the report says what the model does on the other kinds.
        align_biases: with an ONNX model (``'auto'``, the default, or ``True``), move each int8
            convolution's folded bias in ``model`` (its batch norm's beta, or its bias) onto the
            int32 grid onnxruntime adds it on, in place (``qtrainer.quant.export.bias_grid``: a
            shift below half a step of that grid), so that the model, its Paddle and its ONNX
            deployment compute the same (trained MobileNetV1, onnxruntime: 98.8% -> 99.9% top-1
            agreement); ``False`` leaves the model untouched and onnxruntime rounds the biases.
        max_drop: the accuracy-aware fallback (``qtrainer.quant.export.accuracy_fallback``): the
            largest loss of ``metric`` on ``eval_loader`` the deployed model may have against the
            float model (in the metric's units: 0.005 = half a point of top-1); while it loses
            more, the most sensitive layer (sensitivity ranking) is kept in float and the model
            exported again. The report's ``accuracy`` says which layers and the speed cost.
        eval_loader, metric, metric_mode, eval_batches: held-out ``(images, labels)`` batches
            (the first ``eval_batches``; all by default), ``metric(logits, labels) -> float``
            (default top-1 accuracy) and whether higher (``'max'``) or lower (``'min'``) is better.

    Returns:
        an ``ExportReport`` (also written as ``path.quant.json``).
    """
    options = ExportOptions(
        check=CheckOptions(check=check, min_agreement=min_agreement, max_rel_l2=max_rel_l2, fallback=fallback,
                           search_time_limit=search_time_limit, on_failure=on_failure, strict_int8=strict_int8,
                           num_threads=num_threads, measure_speed=measure_speed),
        overwrite=overwrite, run_id=run_id, keep_float=keep_float, fake_quant_layers=fake_quant_layers,
        clip_activations=clip_activations, formats=tuple(formats) if isinstance(formats, list) else formats,
        target=target, align_biases=align_biases,
    )
    check_max_drop(max_drop, eval_loader, metric, metric_mode)
    if max_drop is not None:
        _check_model(model)
        return export_within_drop(model, path, input_spec, sample_inputs, options, _export, max_drop=max_drop,
                                  eval_loader=eval_loader, metric=metric, mode=metric_mode, eval_batches=eval_batches)
    return _export(model, path, input_spec, sample_inputs, options)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if isinstance(model, QuantedLayer):
        raise ValueError(
            "export_quantized_model needs the model that contains the quantized layers, not a bare "
            f"{type(model).__name__}; wrap it, e.g. paddle.nn.Sequential(layer)"
        )
    if next(iter_quanted_layers(model), None) is None:
        raise ValueError(
            f"export_quantized_model: {type(model).__name__} has no quantized layer; quantize it "
            "first (QAT(...).quantize(model), or PTQ) -- a float model exports with paddle.jit.save"
        )


def _export(model: nn.Layer, path: str, input_spec: Sequence[Any] | None, sample_inputs: Any,
            options: ExportOptions) -> ExportReport:
    started = time.monotonic()
    _check_model(model)
    checking = options.check
    prefix = check_export_target(path, options.overwrite, options.run_id)
    staging, created_dirs = make_export_staging(prefix)
    published = False
    try:
        context = _prepare(model, input_spec, sample_inputs, options, staging)
        exporter = _Exporter(context)
        aligned = _align_biases(model, context, exporter) if options.align_biases and "onnx" in options.formats else None
        plans = context.plans
        candidates = [n for n in exporter.order if plans[n].export == "int8"]
        if not candidates:
            raise ValueError(
                "export_quantized_model: no layer can be exported as int8: "
                + "; ".join(f"{n}: {p.reason}" for n, p in plans.items())
            )
        forced = frozenset(n for n in candidates if matches(n, options.fake_quant_layers))
        floated, clipped = forced, frozenset()
        if checking.check:
            first = exporter.attempt(floated)
            if not first.result.numerics_ok and checking.fallback:
                deadline = time.monotonic() + checking.search_time_limit
                floated, passed = find_culprits(
                    [n for n in candidates if n not in forced],
                    exporter.fails,
                    base=forced,
                    first_guess=[n for n in candidates if plans[n].act_signed],
                    deadline=deadline,
                )
                if passed:
                    floated, clipped = _int8_with_clip(exporter, plans, floated, forced, deadline)
        final = exporter.attempt(floated, clipped, run_check=checking.check)
        for name, plan in plans.items():
            plan.float_output = name in final.float_output
        mark_fallback(plans, final.floated, final.clipped, forced)
        report = ExportReport(
            path=prefix,
            files={},
            layers=[plans[n] for n in exporter.order_all()],
            input_spec=[spec_dict(s) for s in context.spec],
            check=final.result,
            sample_source=context.source if checking.check else None,
            attempts=[a.to_dict() for a in exporter.attempts],
            run_id=options.run_id,
            target=resolve_target(options.target),
            accuracy=options.accuracy,
        )
        if checking.measure_speed:
            report.speed = exporter.measure_speed(final)
        if "onnx" in options.formats:
            report.onnx = {**_write_onnx(final, context), "aligned_biases": aligned}
        if "openvino" in options.formats:  # from the ONNX model just written, if it was asked for
            report.openvino = _write_openvino(final, context, reuse_onnx="onnx" in options.formats)
        _log_check(report, prefix, checking.on_failure)
        publish_export(final.directory, prefix, report)
        report.written = published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not published:
            remove_empty(created_dirs)
    logger.info("%s (%.1f s)", report.summary(), time.monotonic() - started)
    return report


def _align_biases(model: nn.Layer, context: "_Context", exporter: "_Exporter") -> dict[str, Any]:
    """Put the biases of ``model`` and of the working copy on onnxruntime's int32 grid (``bias_grid``),
    read from a program traced with every planned layer int8; the check's reference follows."""
    from qtrainer.quant.export.onnx import onnx_bias_shifts

    directory = os.path.join(context.staging, "bias-grid")
    os.makedirs(directory)
    traced = exporter.build(frozenset())
    exporter.save(traced, directory)
    aligned = align_biases([model, context.work], traced, onnx_bias_shifts(os.path.join(directory, "model")))
    shutil.rmtree(directory, ignore_errors=True)
    if aligned["biases"]:
        _, context.reference = observe_layers(context.work, dict(iter_quanted_layers(context.work)), context.batches)
    logger.info("export: %d biases moved onto onnxruntime's int32 grid (largest shift %.3g)",
                aligned["biases"], aligned["max_shift"])
    return aligned


def _write_openvino(final: "_Attempt", context: "_Context", reuse_onnx: bool) -> dict[str, Any]:
    """Convert the chosen attempt to OpenVINO IR beside it (through its ONNX model: the one
    ``_write_onnx`` wrote when ``reuse_onnx``); check it like the Paddle model."""
    from qtrainer.quant.export.openvino import check_openvino, convert_openvino

    def convert(stem: str, path: str) -> dict[str, Any]:
        convert_openvino(stem, path, calibration=context.batches, onnx_model=stem + ".onnx" if reuse_onnx else None)
        return {"converted_from": "onnx"}

    return _write_other_format(final, context, ".xml", convert, check_openvino)


def _write_onnx(final: "_Attempt", context: "_Context") -> dict[str, Any]:
    """Convert the chosen attempt to ONNX beside it; check it on onnxruntime like the Paddle model."""
    from qtrainer.quant.export.onnx import check_onnx, convert_to_onnx

    def convert(stem: str, path: str) -> dict[str, Any]:
        conversion = convert_to_onnx(stem, path, calibration=context.batches)
        return {"conversion": {k: v for k, v in conversion.items() if k != "path"}}

    return _write_other_format(final, context, ".onnx", convert, check_onnx)


def _write_other_format(final: "_Attempt", context: "_Context", suffix: str, convert, check) -> dict[str, Any]:
    """``convert(stem, path)`` the attempt into ``model<suffix>`` beside it, then ``check`` that file
    against the simulation's outputs with the Paddle check's options (when the check ran)."""
    stem = os.path.join(final.directory, "model")
    summary = convert(stem, stem + suffix)
    if final.result is None:
        return {**summary, "checked": False}
    options = context.check
    result = check(stem + suffix, context.batches, context.reference, options.max_rel_l2, options.min_agreement,
                   options.num_threads, expected_int8_ops=final.result.expected_int8_ops)
    result.pop("model", None)  # the staging path; the file is published beside the Paddle model
    return {**summary, **result}


def _log_check(report: ExportReport, prefix: str, on_failure: str) -> None:
    """Warn about the check's notes and caveats; raise ``ExportCheckError`` when it failed (``'raise'``)."""
    for runtime, result in (("OpenVINO", report.openvino), ("ONNX (onnxruntime)", report.onnx)):
        if result is None:
            continue
        if result.get("notes"):
            logger.warning("export %s, %s model: %s", prefix, runtime, "; ".join(result["notes"]))
        if result.get("passed") is False:
            message = (f"export {prefix}: the {runtime} model disagrees with the simulation: "
                       f"{'; '.join(result.get('failures', [])) or result}")
            if on_failure == "raise":
                raise ExportCheckError(message + " (nothing written; on_failure='write' writes it anyway)", report)
            logger.error("%s (written anyway: on_failure='write')", message)
    check = report.check
    if check is None:
        return
    if check.notes:
        logger.warning("export %s: %s", prefix, "; ".join(check.notes))
    if check.caveats:
        logger.warning(
            "export %s: the self-check is weak here: %s -- check the deployed model on real "
            "data (qtrainer.quant.export.inference)", prefix, "; ".join(check.caveats)
        )
    if not check.passed:
        message = (
            f"export self-check failed for {prefix}: {check.summary()}; kept float: "
            f"{sorted(report.kept_float) or 'none'}"
        )
        if on_failure == "raise":
            raise ExportCheckError(message + " (nothing written; on_failure='write' writes it anyway)", report)
        logger.error("%s (written anyway: on_failure='write')", message)


@dataclass
class _Context:
    """What every attempt of one export shares: the working copy, its plan, the samples, the options."""

    work: nn.Layer
    plans: dict[str, LayerExport]
    weights: dict[str, np.ndarray]
    spec: list
    batches: list
    source: str
    reference: list[np.ndarray]
    order: list[str]
    staging: str
    check: CheckOptions
    caveats: list[str]


def _prepare(model: nn.Layer, input_spec, sample_inputs, options: ExportOptions, staging: str) -> _Context:
    """The working copy, the samples and spec, and every layer's plan (nothing traced yet)."""
    work = working_copy(model)
    quanted = dict(iter_quanted_layers(work))
    for name, layer in quanted.items():  # exported as their float layer: so is the reference the check uses
        if matches(name, options.keep_float):
            layer.compute_float = True
    if input_spec is not None:
        input_spec = normalise_spec(input_spec, None)
    # the samples also decide which layer inputs are unsigned, so they are needed without check
    batches, source = sample_batches(sample_inputs, input_spec)
    spec = normalise_spec(input_spec, batches)
    check_batches_match(batches, spec)
    dry_run(work, spec)
    observed, reference = observe_layers(work, quanted, batches)
    plans, weights = plan_layers(quanted, observed, options.keep_float, options.clip_activations,
                                 resolve_target(options.target))
    return _Context(work=work, plans=plans, weights=weights, spec=spec, batches=batches, source=source,
                    reference=reference, order=[n for n in observed.order if n in plans], staging=staging,
                    check=options.check, caveats=_check_caveats(source, plans))


def _check_caveats(source: str, plans: dict[str, LayerExport]) -> list[str]:
    """Why the self-check proves less than usual, known before it runs."""
    caveats = []
    if source == "random":
        caveats.append("random inputs (no sample_inputs), not the data the model was trained or calibrated on")
    zeros = [n for n, p in plans.items() if p.reason and "only saw zeros" in p.reason]
    if zeros:
        caveats.append(
            f"{len(zeros)} layer(s) saw only zeros (scales never observed, e.g. an untrained or "
            f"uncalibrated network) and stay float: {', '.join(zeros[:3])}{', ...' if len(zeros) > 3 else ''}"
        )
    return caveats


def _tie_caveat(comparison) -> list[str]:
    """A caveat when most samples have near-tied top-1 scores (so top-1 agreement says little)."""
    if comparison.zero_reference:
        return ["the model's outputs are all (nearly) zero on these samples (activations vanish, e.g. an "
                "untrained network): there is nothing to compare"]
    if comparison.top1_agreement_all is None or 2 * comparison.judged_samples >= comparison.samples:
        return []
    return [
        f"{comparison.samples - comparison.judged_samples} of {comparison.samples} samples have "
        "near-tied top-1 scores (within the tolerated error); judged by relative L2 error only"
    ]


def _int8_with_clip(exporter: "_Exporter", plans, floated: frozenset, forced: frozenset,
                    deadline: float) -> tuple[frozenset, frozenset]:
    """Try the unsigned fallback layers back in int8 with an explicit clip to ``[0, T]``.

    Such a layer often disagreed only because the deployment keeps values above ``T`` (a KL or
    PACT threshold that clips on purpose) that the simulation clips; the clip restores int8 speed
    for it at the cost of one elementwise op.
    """
    clipped: frozenset = frozenset()
    for name in [n for n in exporter.order if n in floated - forced and not plans[n].act_signed]:
        if time.monotonic() > deadline:
            break
        trial_floated, trial_clipped = floated - {name}, clipped | {name}
        if not exporter.fails(trial_floated, trial_clipped):
            floated, clipped = trial_floated, trial_clipped
    return floated, clipped


@dataclass
class _Attempt:
    floated: frozenset  # layers exported with the fake-quant fallback
    clipped: frozenset  # int8 layers given an explicit clip by the self-check
    directory: str
    result: CheckResult | None
    seconds: float
    float_output: frozenset = frozenset()  # int8 convs traced with an fp32 output (residual barrier)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fallback_layers": sorted(self.floated),
            "clipped_layers": sorted(self.clipped),
            "check": None if self.result is None else self.result.to_dict(),
            "seconds": round(self.seconds, 2),
        }


def _float_output_barrier(layer: nn.Layer, inputs: Any, output: Any) -> Any:
    """Forward post-hook: a no-op ``scale`` after a batch norm, so that Paddle keeps its output fp32."""
    return paddle.scale(output, 1.0)


def _swap_sublayers(model: nn.Layer, swap: dict[int, nn.Layer]) -> None:
    """Replace, in place, every sublayer of ``model`` whose ``id`` is a key of ``swap`` by its value."""
    for parent in [model, *model.sublayers()]:
        for attr, child in list(parent._sub_layers.items()):
            if child is not None and id(child) in swap:
                parent._sub_layers[attr] = swap[id(child)]


class _Exporter:
    """Builds, saves and checks the export with a given set of layers kept in float (cached)."""

    def __init__(self, context: _Context) -> None:
        self.context = context
        self.plans = context.plans
        self.order = context.order
        self.attempts: list[_Attempt] = []
        self._cache: dict[tuple[frozenset, frozenset], _Attempt] = {}
        # both read from the traced programs (``save``); the last attempt's
        self.residual_convs: set[str] = set()  # int8 convs kept fp32-output before a residual add
        self.fused_unsigned: set[str] = set()  # int8 layers whose unsigned input needs no no-op relu
        self.barrier_norms: dict[str, str] = {}  # residual conv -> sublayer path of the batch norm after it

    def order_all(self) -> list[str]:
        return self.order + [n for n in self.plans if n not in self.order]

    def build(self, floated: frozenset, clipped: frozenset = frozenset()) -> nn.Layer:
        """A copy of the model with int8 export layers (fake-quant ones for ``floated``)."""
        model = copy.deepcopy(self.context.work)
        copies = dict(iter_quanted_layers(model))
        swap: dict[int, nn.Layer] = {}
        for name, layer in copies.items():
            plan = self.plans[name]
            if plan.export == "float":
                swap[id(layer)] = layer.layer
            elif name in floated:
                swap[id(layer)] = FAKE_QUANT_TYPES[layer.layer_type](layer, plan)
            else:
                swap[id(layer)] = INT8_TYPES[layer.layer_type](
                    layer, plan, self.context.weights[name], clip=plan.act_clip or name in clipped
                )
        _swap_sublayers(model, swap)
        return model

    def save(self, model: nn.Layer, directory: str) -> None:
        """Trace and save ``model``, with the two decisions read from its own traced program.

        Int8 convolutions before a residual add that Paddle must not fuse get an fp32 output
        (``residual_conv_weights``): a no-op ``scale`` after the batch norm that follows the conv
        (``norms_after_convs``; Paddle still folds it into the conv), else after the conv itself.
        Int8 layers whose unsigned input Paddle fuses into a conv + relu/relu6 get no no-op relu
        (``fused_unsigned_inputs``). These depend on which layers are int8 in this attempt, so every
        attempt checks them on its program and traces again when they changed (the analysis reads
        the same sets from a program already traced with them).
        """
        int8_layers = [layer for layer in model.sublayers() if isinstance(layer, tuple(INT8_TYPES.values()))]
        layers = dict(model.named_sublayers())  # paths, stable across the copies of later attempts
        norms = {layer.weight.name: path for path, layer in layers.items()
                 if isinstance(layer, FOLDABLE_NORMS) and getattr(layer, "weight", None) is not None}
        for _ in range(3):
            for layer in int8_layers:
                layer.float_output = (isinstance(layer, Int8Conv2D) and layer.export_name in self.residual_convs
                                      and layer.export_name not in self.barrier_norms)
                layer.unsigned_by_fusion = layer.export_name in self.fused_unsigned
            hooks = [layers[path].register_forward_post_hook(_float_output_barrier)
                     for path in self.barrier_norms.values()]
            try:
                self._trace(model, directory)
            finally:
                for hook in hooks:
                    hook.remove()
            ops = read_program_ops(os.path.join(directory, "model.pdmodel"))
            weights = residual_conv_weights(ops)
            residual = {layer.export_name for layer in int8_layers
                        if isinstance(layer, Int8Conv2D) and layer.weight_int8.name in weights}
            after = norms_after_convs(ops, weights)
            barrier_norms = {layer.export_name: norms[after[layer.weight_int8.name]] for layer in int8_layers
                             if isinstance(layer, Int8Conv2D) and after.get(layer.weight_int8.name) in norms}
            scales = fused_unsigned_inputs(ops)
            unsigned = {layer.export_name for layer in int8_layers if layer.act_scale.name in scales
                        and not self.plans[layer.export_name].act_signed}
            decisions = (residual, unsigned, barrier_norms)
            if decisions == (self.residual_convs, self.fused_unsigned, self.barrier_norms):
                break
            self.residual_convs, self.fused_unsigned, self.barrier_norms = decisions
        else:
            raise RuntimeError("export: the residual/unsigned decisions did not settle after three traces")

    def _trace(self, model: nn.Layer, directory: str) -> None:
        prefix = os.path.join(directory, "model")
        try:
            with paddle.pir_utils.DygraphOldIrGuard():
                paddle.jit.save(model, prefix, input_spec=list(self.context.spec))
        finally:
            if not paddle.in_dynamic_mode():  # never leave the caller in static mode
                paddle.disable_static()

    def attempt(
        self, floated: frozenset, clipped: frozenset = frozenset(), run_check: bool = True
    ) -> _Attempt:
        key = (floated, clipped)
        if key in self._cache:
            return self._cache[key]
        start = time.monotonic()
        directory = os.path.join(self.context.staging, f"attempt-{len(self.attempts)}")
        os.makedirs(directory)
        model = self.build(floated, clipped)
        self.save(model, directory)
        result = None
        if run_check:
            result = self._check(directory, floated)
            logger.info("export check, fake-quant %s, clipped %s: %s", sorted(floated) or "none",
                        sorted(clipped) or "none", result.summary())
        record = _Attempt(floated, clipped, directory, result, time.monotonic() - start,
                          frozenset(self.residual_convs))
        self.attempts.append(record)
        self._cache[key] = record
        return record

    def _check(self, directory: str, floated: frozenset) -> CheckResult:
        """Run the saved attempt on the samples with an int8 predictor and judge it against the reference."""
        context, options = self.context, self.context.check
        predictor, counts = load_int8_predictor(os.path.join(directory, "model"), options.num_threads)
        deployed = run_predictor(predictor, context.batches)
        del predictor
        expected = sum(p.calls for n, p in self.plans.items() if p.export == "int8" and n not in floated)
        comparison = compare_samples(deployed, context.reference, margin_rel_l2=options.max_rel_l2)
        return judge(comparison.samples, comparison.rel_l2, comparison.top1_agreement, counts,
                     expected, options.min_agreement, options.max_rel_l2, options.strict_int8,
                     comparison=comparison, caveats=context.caveats + _tie_caveat(comparison))

    def measure_speed(self, final: _Attempt) -> dict[str, Any]:
        """The chosen attempt's int8 latency against the same model in float (``speed.measure_speed``)."""
        float_dir = os.path.join(self.context.staging, "float")
        os.makedirs(float_dir, exist_ok=True)
        model = copy.deepcopy(self.context.work)
        _swap_sublayers(model, {id(layer): layer.layer for _, layer in iter_quanted_layers(model)})
        self._trace(model, float_dir)
        batch = [np.ascontiguousarray(a[:1]) for a in self.context.batches[0]]
        speed = measure_speed(os.path.join(final.directory, "model"), os.path.join(float_dir, "model"), batch,
                              num_threads=self.context.check.num_threads)
        kept = [n for n in self.order_all() if self.plans[n].export != "int8" or n in final.floated]
        warning = slow_int8_warning(speed, kept, sorted(final.float_output))
        if warning:
            speed["warning"] = warning
            logger.warning("export: %s", warning)
        return speed

    def fails(self, floated: frozenset, clipped: frozenset = frozenset()) -> bool:
        """True while the deployed outputs miss the thresholds (``floated`` as fake-quant layers)."""
        return not self.attempt(floated, clipped).result.numerics_ok
