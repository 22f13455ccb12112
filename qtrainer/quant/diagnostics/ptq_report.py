"""Per-layer PTQ report: which layers lose the most to quantization, and why.

``build_ptq_report(model, sample_inputs)`` measures a frozen PTQ model (or any quantized model,
in eval mode) on a few batches and returns a ``PTQReport`` with one row per quantized layer:

* ``threshold`` -- the activation threshold the model uses (its calibrator's choice).
* ``absmax``, ``kl``, ``hist``, ``mse`` -- the threshold each calibration method gives on the
  *same* histogram of the layer's input ``|x|``: the calibration histogram when the layer's
  calibrator keeps one (KL, Hist, MSE), otherwise a histogram of the layer inputs on the report
  batches (``histogram_source`` says which). ``hist`` is the ``hist_percent`` quantile.
* ``clipped_fraction`` -- the fraction of that histogram's values above ``threshold``.
* ``sqnr_db`` -- signal-to-quantization-noise ratio of the layer's quantized output against its
  float output *on the same input*, ``10 log10(sum(y^2) / sum((y - y_q)^2))``: the error this
  layer adds by itself. Low values mark the layers to keep in float (``skip_patterns``).
* ``accumulated_sqnr_db`` -- the layer's output in the quantized model against its output in the
  float model on the same batches: the error accumulated up to and including this layer.

Rows are sorted by ``sqnr_db``, worst first. ``report.write(prefix)`` writes
``prefix.ptq_report.json`` and ``prefix.ptq_report.csv`` (non-finite numbers become empty/null);
``report.scalars()`` and ``report.histograms()`` give the values a logger takes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import paddle
from paddle import nn

from qtrainer._io import atomic_write_text
from qtrainer.quant.diagnostics.sqnr import SqnrAccumulator as _Accumulator
from qtrainer.quant.diagnostics.sqnr import finite_or_none as _finite_or_none
from qtrainer.quant.diagnostics.sqnr import first_tensor as _first_tensor
from qtrainer.quant.diagnostics.stats import stat_tag
from qtrainer.quant.export.samples import first_inputs
from qtrainer.quant.methods.ptq import unfrozen_layers
from qtrainer.quant.observers.absmax import AbsmaxCalibrator
from qtrainer.quant.observers.calibrators import seed_name
from qtrainer.quant.observers.histogram import HistCalibrator, HistogramCalibrator
from qtrainer.quant.observers.thresholds import clipped_fraction, kl_threshold, mse_threshold, percentile_threshold
from qtrainer.quant.quanters.fake_quant import FakeQuanter
from qtrainer.quant.transforms.fuse import EvalMode
from qtrainer.quant.transforms.wrap import QuantedLayer, computing_float, iter_quanted_layers

__all__ = ["LayerReport", "PTQReport", "build_ptq_report", "REPORT_SUFFIX"]

REPORT_SUFFIX = ".ptq_report"
FORMAT_NAME, FORMAT_VERSION = "qtrainer-ptq-report", 1
COLUMNS = (
    "name", "type", "calibrator", "act_bits", "threshold", "absmax", "kl", "hist", "mse",
    "hist_percent", "clipped_fraction", "sqnr_db", "accumulated_sqnr_db", "calls", "histogram_source",
)
DEFAULT_HIST_PERCENT = 0.99999


@dataclass
class LayerReport:
    """One quantized layer (see the module docstring for each field)."""

    name: str
    type: str
    calibrator: str
    act_bits: int
    threshold: float | None
    absmax: float | None = None
    kl: float | None = None
    hist: float | None = None
    mse: float | None = None
    hist_percent: float = DEFAULT_HIST_PERCENT
    clipped_fraction: float | None = None
    sqnr_db: float | None = None
    accumulated_sqnr_db: float | None = None
    calls: int = 0
    histogram_source: str | None = None
    #: (counts of |x| zeros included, bin width) -- for histogram logging, not written to files
    histogram: tuple[np.ndarray, float] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("histogram")
        return {k: _finite_or_none(v) for k, v in out.items()}


@dataclass
class PTQReport:
    """Per-layer rows sorted by ``sqnr_db`` (worst first) and the whole model's output SQNR."""

    layers: list[LayerReport]
    batches: int
    samples: int
    output_sqnr_db: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "sorted_by": "sqnr_db, ascending: the layers that lose the most come first",
            "batches": self.batches,
            "samples": self.samples,
            "output_sqnr_db": _finite_or_none(self.output_sqnr_db),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for layer in self.layers:
            row = layer.to_dict()
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        return buffer.getvalue()

    def write(self, prefix: str) -> dict[str, str]:
        """Write ``prefix.ptq_report.json`` and ``.csv`` (each atomically); return their paths."""
        prefix = os.fspath(prefix)
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        files = {"json": f"{prefix}{REPORT_SUFFIX}.json", "csv": f"{prefix}{REPORT_SUFFIX}.csv"}
        atomic_write_text(files["json"], json.dumps(self.to_dict(), indent=2) + "\n", "PTQ report")
        atomic_write_text(files["csv"], self.to_csv(), "PTQ report")
        return files

    def scalars(self, prefix: str = "quant") -> dict[str, float]:
        """Finite values as ``<prefix>/<stat>/<layer>`` tags (``stat_tag``), plus ``<prefix>/summary/...``."""
        names = {
            "threshold": "act_threshold", "absmax": "act_threshold_absmax", "kl": "act_threshold_kl",
            "hist": "act_threshold_hist", "mse": "act_threshold_mse",
            "clipped_fraction": "act_clip_fraction", "sqnr_db": "output_sqnr_db",
            "accumulated_sqnr_db": "accumulated_output_sqnr_db",
        }
        out: dict[str, float] = {}
        for layer in self.layers:
            for attr, tag in names.items():
                value = getattr(layer, attr)
                if value is not None and math.isfinite(value):
                    out[stat_tag(tag, layer.name, prefix)] = float(value)
        finite = [l.sqnr_db for l in self.layers if l.sqnr_db is not None and math.isfinite(l.sqnr_db)]
        if finite:
            out[f"{prefix}/summary/min_output_sqnr_db"] = float(min(finite))
        if self.output_sqnr_db is not None and math.isfinite(self.output_sqnr_db):
            out[f"{prefix}/summary/model_output_sqnr_db"] = float(self.output_sqnr_db)
        return out

    def histograms(self, prefix: str = "quant") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{<prefix>/act_histogram/<layer>: (bin edges, counts)}`` of each layer's ``|x|``."""
        out = {}
        for layer in self.layers:
            if layer.histogram is None:
                continue
            counts, width = layer.histogram
            nonzero = np.flatnonzero(counts)
            n = int(nonzero[-1]) + 1 if nonzero.size else 1
            out[stat_tag("act_histogram", layer.name, prefix)] = (np.arange(n + 1) * width, counts[:n].copy())
        return out

    def worst(self, n: int = 5) -> list[str]:
        """Names of the ``n`` layers with the lowest ``sqnr_db``."""
        return [layer.name for layer in self.layers[:n]]


# ---------------------------------------------------------------------- measuring
def _batches(sample_inputs: Any, max_batches: int) -> list[paddle.Tensor]:
    if sample_inputs is None:
        raise ValueError("build_ptq_report needs sample_inputs: a Tensor/array, a list of them, or a loader")
    if isinstance(sample_inputs, (paddle.Tensor, np.ndarray)):
        items = [sample_inputs]
    elif isinstance(sample_inputs, (list, tuple)):
        items = [s[0] if isinstance(s, (list, tuple)) else s for s in sample_inputs][:max_batches]
    else:
        items = first_inputs(sample_inputs, max_batches)
    if not items:
        raise ValueError("build_ptq_report: sample_inputs holds no batch")
    return [x if isinstance(x, paddle.Tensor) else paddle.to_tensor(np.asarray(x)) for x in items]


def _check_frozen(model: nn.Layer) -> None:
    waiting = unfrozen_layers(model)
    if waiting:
        raise RuntimeError(
            f"build_ptq_report: PTQ layers {waiting[:5]} are still calibrating; call "
            "qtrainer.quant.freeze(model) (or PTQ.freeze) first"
        )


def build_ptq_report(
    model: nn.Layer,
    sample_inputs: Any,
    max_batches: int = 4,
    hist_percent: float = DEFAULT_HIST_PERCENT,
    forward: Callable[[paddle.Tensor], Any] | None = None,
) -> PTQReport:
    """Measure every quantized layer of ``model`` on up to ``max_batches`` batches.

    Args:
        model: a frozen PTQ model (``PTQ.freeze`` / ``save_quantized_model``), or any model
            quantized by qtrainer; it runs in eval mode without gradient, and is left unchanged.
        sample_inputs: model inputs: a Tensor/array, a list of them, or a loader (the first
            element of each batch is the input).
        hist_percent: the quantile used for the ``hist`` column (a ``HistQuantizer`` layer uses
            its own ``hist_percent``).
        forward: ``forward(x)`` runs the model on one input (default ``model(x)``).
    """
    if not isinstance(model, nn.Layer):
        raise TypeError(f"build_ptq_report: model must be a paddle.nn.Layer, got {type(model).__name__}")
    quanted = dict(iter_quanted_layers(model))
    if not quanted:
        raise ValueError(f"build_ptq_report: {type(model).__name__} has no quantized layer")
    _check_frozen(model)
    batches = _batches(sample_inputs, max_batches)
    run = forward or model
    # layers whose calibrator keeps no histogram get one from the report batches
    collectors = {
        name: HistogramCalibrator(quant_bits=layer.act_bits)
        for name, layer in quanted.items() if not isinstance(_calibrator(layer), HistogramCalibrator)
    }
    isolated = {name: _Accumulator() for name in quanted}
    accumulated = {name: _Accumulator() for name in quanted}
    calls = {name: 0 for name in quanted}
    float_outputs: dict[str, list[paddle.Tensor]] = {}
    model_output = _Accumulator()
    phase = {"float": True}
    call_index: dict[str, int] = {}

    def make_hook(name: str):
        def hook(layer: QuantedLayer, inputs: tuple, output: paddle.Tensor) -> None:
            x = inputs[0]
            if phase["float"]:
                float_outputs.setdefault(name, []).append(output.detach())
                if name in collectors:
                    collectors[name].observe(x.detach())
                return
            index = call_index.get(name, 0)
            call_index[name] = index + 1
            calls[name] += 1
            isolated[name].add(layer.layer(x), output)
            reference = float_outputs.get(name, [])
            if index < len(reference):
                accumulated[name].add(reference[index], output)

        return hook

    handles = [layer.register_forward_post_hook(make_hook(name)) for name, layer in quanted.items()]
    try:
        with EvalMode(model), paddle.no_grad():
            for x in batches:
                float_outputs.clear()
                call_index.clear()
                phase["float"] = True
                with computing_float(model):
                    float_out = _first_tensor(run(x))
                phase["float"] = False
                quant_out = _first_tensor(run(x))
                if float_out is not None and quant_out is not None:
                    model_output.add(float_out, quant_out)
    finally:
        for handle in handles:
            handle.remove()
    rows = [
        _layer_row(name or type(model).__name__, layer, collectors.get(name), hist_percent,
                   isolated[name].sqnr_db(), accumulated[name].sqnr_db(), calls[name])
        for name, layer in quanted.items()
    ]
    rows.sort(key=_sort_key)
    return PTQReport(layers=rows, batches=len(batches), samples=int(sum(int(x.shape[0]) for x in batches)),
                     output_sqnr_db=model_output.sqnr_db())


def _sort_key(row: LayerReport) -> tuple[int, float]:
    value = row.sqnr_db
    if value is None or math.isnan(value):
        return (1, 0.0)
    return (0, value)


def _calibrator(layer: QuantedLayer) -> nn.Layer | None:
    quanter = layer.act_quanter
    return quanter.observer if isinstance(quanter, FakeQuanter) else None


def _layer_row(name, layer, collector, hist_percent, sqnr, accumulated, calls) -> LayerReport:
    calibrator = _calibrator(layer)
    try:
        threshold = float(np.asarray(layer.act_scale().numpy()).reshape(-1)[0])
    except TypeError:  # a user quanter without scale()
        threshold = None
    source_cal = calibrator if collector is None else collector
    row = LayerReport(
        name=name,
        type=layer.layer_type,
        calibrator=seed_name(calibrator) if calibrator is not None else type(layer.act_quanter).__name__,
        act_bits=int(layer.act_bits),
        threshold=threshold,
        hist_percent=calibrator.hist_percent if isinstance(calibrator, HistCalibrator) else float(hist_percent),
        sqnr_db=sqnr,
        accumulated_sqnr_db=accumulated,
        calls=calls,
        histogram_source="calibration" if collector is None else "report batches",
    )
    if not source_cal.has_observed() or source_cal.all_zero():
        return row
    counts, width = source_cal.histogram(exclude_zeros=False)
    nonzero_counts, _ = source_cal.histogram(exclude_zeros=True)
    fine, fine_width = source_cal.fine_histogram()
    bits = row.act_bits
    row.histogram = (counts, width)
    row.absmax = (
        float(calibrator.absmax.numpy().reshape(-1)[0]) if isinstance(calibrator, AbsmaxCalibrator)
        else float((np.flatnonzero(fine)[-1] + 1) * fine_width)
    )
    row.hist = percentile_threshold(counts, width, row.hist_percent)
    if nonzero_counts.sum() > 0:
        row.kl = kl_threshold(nonzero_counts, width, bits)
        row.mse = mse_threshold(nonzero_counts, width, bits)
    if threshold is not None:
        row.clipped_fraction = clipped_fraction(counts, width, threshold)
    return row
