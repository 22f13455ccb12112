"""Ranking quantized layers by how much each costs a metric (the measuring half of ``sensitivity``).

``rank_layers(work, batches, metric)`` evaluates the quantized model ``work`` on cached
``(images, labels)`` batches with all layers float, all quantized, and per layer only it quantized /
all but it quantized (``computing_float``), and returns a ``SensitivityReport`` sorted most
sensitive first. It knows nothing of how ``work`` was quantized, so the export's accuracy-aware
fallback can use it without the PTQ engine; ``qtrainer.quant.diagnostics.sensitivity`` adds the
argument checks, the PTQ preparation and the files.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import paddle
from paddle import nn

from qtrainer._io import atomic_write_text
from qtrainer.data.iteration import close_iterator, guard_iterator
from qtrainer.quant.diagnostics.bar_chart import write_bar_chart_png
from qtrainer.quant.diagnostics.sqnr import SqnrAccumulator, finite_or_none, first_tensor
from qtrainer.quant.diagnostics.stats import collect_quant_stats
from qtrainer.quant.transforms.wrap import computing_float, iter_quanted_layers

__all__ = ["LayerSensitivity", "SensitivityReport", "rank_layers", "top1_accuracy", "read_eval_batches",
           "metric_value", "MODES", "COLUMNS"]

_log = logging.getLogger(__name__)

MODES = ("max", "min")
FORMAT_NAME, FORMAT_VERSION = "qtrainer-sensitivity", 1
FILE_NAMES = {"csv": "sensitivity.csv", "json": "sensitivity.json", "png": "sensitivity.png"}
COLUMNS = (
    "rank", "name", "type", "only_this_quantized", "all_but_this_quantized", "drop_only_this",
    "gain_all_but_this", "weight_sqnr_db", "output_sqnr_db",
)


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows of ``outputs`` (logits ``[N, classes]``) whose argmax is the label."""
    outputs, labels = np.asarray(outputs), np.asarray(labels).reshape(-1)
    if outputs.ndim != 2:
        raise ValueError(
            f"top1_accuracy needs logits of shape [batch, classes], got shape {list(outputs.shape)}; "
            "pass sensitivity(..., metric=...) for other outputs"
        )
    if labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"top1_accuracy: {outputs.shape[0]} outputs but {labels.shape[0]} labels")
    return float(np.mean(outputs.argmax(axis=-1) == labels))


@dataclass
class LayerSensitivity:
    """One quantized layer. Metric values are raw; ``drop_*``/``gain_*`` are signed so that a
    positive value means quantizing the layer hurts, whatever ``mode``."""

    name: str
    type: str
    only_this_quantized: float
    all_but_this_quantized: float
    drop_only_this: float  # float metric - only this quantized (mode 'max')
    gain_all_but_this: float  # all but this quantized - all quantized (mode 'max')
    weight_sqnr_db: float | None = None  # collect_quant_stats: the fake-quantized weight vs the float one
    output_sqnr_db: float | None = None  # the layer's output with only it quantized vs float (first batch)

    def to_dict(self) -> dict[str, Any]:
        return {k: finite_or_none(v) for k, v in asdict(self).items()}


@dataclass
class SensitivityReport:
    """What ``sensitivity`` measured: ``layers`` most sensitive first, and the whole-model metrics."""

    layers: list[LayerSensitivity]
    float_metric: float
    quantized_metric: float
    method: str
    mode: str = "max"
    metric_name: str = "top1_accuracy"
    eval_batches: int = 0
    eval_samples: int = 0
    calib_batches: int | None = None
    files: dict[str, str] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [layer.name for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "metric": self.metric_name,
            "mode": self.mode,
            "sorted_by": "gain_all_but_this then drop_only_this, descending: the most sensitive layers come first",
            "float_metric": self.float_metric,
            "quantized_metric": self.quantized_metric,
            "eval_batches": self.eval_batches,
            "eval_samples": self.eval_samples,
            "calib_batches": self.calib_batches,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for rank, layer in enumerate(self.layers, start=1):
            row = {"rank": rank, **layer.to_dict()}
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike) -> str:
        """Write the rows as CSV (atomically); return the path."""
        atomic_write_text(os.fspath(path), self.to_csv(), "sensitivity report")
        return os.fspath(path)

    def write_json(self, path: str | os.PathLike) -> str:
        """Write ``to_dict()`` as JSON (atomically; non-finite numbers become null); return the path."""
        atomic_write_text(os.fspath(path), json.dumps(self.to_dict(), indent=2) + "\n", "sensitivity report")
        return os.fspath(path)

    def write_png(self, path: str | os.PathLike) -> str:
        """A bar chart of ``gain_all_but_this`` per layer, most sensitive first; return the path."""
        return write_bar_chart_png(
            path, self.ranking(), [layer.gain_all_but_this for layer in self.layers],
            title=f"{self.metric_name} recovered when the layer alone stays float",
        )

    def write(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``sensitivity.csv``, ``.json`` and ``.png`` into ``output_dir``; return their paths."""
        directory = os.fspath(output_dir)
        os.makedirs(directory, exist_ok=True)
        paths = {kind: os.path.join(directory, name) for kind, name in FILE_NAMES.items()}
        self.write_csv(paths["csv"])
        self.write_json(paths["json"])
        self.write_png(paths["png"])
        self.files = paths
        return paths

    def scalars(self) -> dict[str, float]:
        """``sensitivity/only_this/<layer>``, ``sensitivity/all_but_this/<layer>``, ``sensitivity/float``
        and ``sensitivity/quantized``: the metric values, for a logger."""
        out = {"sensitivity/float": self.float_metric, "sensitivity/quantized": self.quantized_metric}
        for layer in self.layers:
            out[f"sensitivity/only_this/{layer.name}"] = layer.only_this_quantized
            out[f"sensitivity/all_but_this/{layer.name}"] = layer.all_but_this_quantized
        return out


def read_eval_batches(loader: Iterable, limit: int | None) -> list[tuple[paddle.Tensor, np.ndarray]]:
    """The first ``limit`` (all: None) ``(images, labels)`` batches of ``loader``, read once (``ValueError`` when none)."""
    batches: list[tuple[paddle.Tensor, np.ndarray]] = []
    iterator = guard_iterator(iter(loader))
    try:
        for index, batch in enumerate(iterator):
            if limit is not None and index >= limit:
                break
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError(
                    f"sensitivity: loader batch {index} is a {type(batch).__name__}; each batch must be an "
                    "(images, labels) pair"
                )
            images, labels = batch[0], batch[1]
            if not isinstance(images, paddle.Tensor):
                images = paddle.to_tensor(np.asarray(images))
            labels = labels.numpy() if isinstance(labels, paddle.Tensor) else np.asarray(labels)
            batches.append((images, labels))
    finally:
        close_iterator(iterator)
    if not batches:
        raise ValueError(
            f"sensitivity: the loader ({type(loader).__name__}) yielded no batch; give it at least one "
            "(images, labels) batch"
        )
    return batches


def metric_value(value: Any, where: str, metric_name: str) -> float:
    """``value`` (a metric's result) as a float; ``ValueError`` naming it when it is not one finite number."""
    number: float | None = None
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    if number is None or not math.isfinite(number):
        shown = f"{type(value).__name__} {value!r}" if number is None else repr(number)
        raise ValueError(
            f"sensitivity: metric {metric_name} returned {shown} {where}; it must return one finite number "
            "(e.g. an accuracy as a float)"
        )
    return number


class _Evaluator:
    """Runs the working model over the cached batches and scores the concatenated outputs."""

    def __init__(self, model: nn.Layer, batches: list[tuple[paddle.Tensor, np.ndarray]],
                 metric: Callable[[np.ndarray, np.ndarray], Any], metric_name: str) -> None:
        self.model = model
        self.batches = batches
        self.metric = metric
        self.metric_name = metric_name
        self.labels = np.concatenate([np.asarray(labels) for _, labels in batches], axis=0)

    def __call__(self, where: str, first_batch_hooks: Sequence[tuple[nn.Layer, Callable]] = ()) -> float:
        outputs = []
        for index, (images, _) in enumerate(self.batches):
            hooks = first_batch_hooks if index == 0 else ()
            handles = [layer.register_forward_post_hook(hook) for layer, hook in hooks]
            try:
                raw = self.model(images)
            finally:
                for handle in handles:
                    handle.remove()
            out = first_tensor(raw)
            if out is None:
                raise TypeError(
                    f"sensitivity: the model returned no Tensor ({type(raw).__name__}); it must return the "
                    "outputs (logits) the metric scores"
                )
            outputs.append(out.numpy())
        return metric_value(self.metric(np.concatenate(outputs, axis=0), self.labels), where, self.metric_name)


def _recorder(store: list) -> Callable:
    def hook(layer: nn.Layer, inputs: tuple, output: Any) -> None:
        if isinstance(output, paddle.Tensor):
            store.append(output.detach())

    return hook


def _output_sqnr(reference: list[paddle.Tensor], outputs: list[paddle.Tensor]) -> float | None:
    acc = SqnrAccumulator()
    for ref, out in zip(reference, outputs):
        acc.add(ref, out)
    return acc.sqnr_db() if reference and outputs else None


def rank_layers(work: nn.Layer, batches: list, metric: Callable | None = None, mode: str = "max",
                method: str = "qat-state", calib_batches: int | None = None) -> SensitivityReport:
    """The per-layer sensitivity of the quantized model ``work`` (changed only while measuring) on ``batches``.

    ``batches``: ``(images Tensor, labels array)`` pairs (``read_eval_batches``); ``metric`` and
    ``mode`` as in ``qtrainer.quant.diagnostics.sensitivity.sensitivity``, which checks the arguments
    and prepares ``work``. ``2 * layers + 2`` evaluation passes.
    """
    work.eval()
    metric_fn = metric if metric is not None else top1_accuracy
    metric_name = getattr(metric_fn, "__name__", type(metric_fn).__name__)
    evaluate = _Evaluator(work, batches, metric_fn, metric_name)
    layers = list(iter_quanted_layers(work))
    all_layers = [layer for _, layer in layers]
    keys = [name for name, _ in layers]  # computing_float's names ("" for a quantized root)
    names = [name or type(work).__name__ for name, _ in layers]
    stats = collect_quant_stats(work)
    sign = 1.0 if mode == "max" else -1.0
    rows: list[LayerSensitivity] = []
    with paddle.no_grad():
        # all quantized first: a model's first forward also finds its residual blocks
        quantized_metric = evaluate("with every layer quantized")
        reference: dict[str, list[paddle.Tensor]] = {name: [] for name in names}
        with computing_float(work):
            float_metric = evaluate("on the float model", [(layer, _recorder(reference[name]))
                                                            for name, layer in zip(names, all_layers)])
        for key, name, layer in zip(keys, names, all_layers):
            outputs: list[paddle.Tensor] = []
            with computing_float(work, [k for k in keys if k != key]):
                only = evaluate(f"with only layer {name!r} quantized", [(layer, _recorder(outputs))])
            with computing_float(work, [key]):
                all_but = evaluate(f"with every layer but {name!r} quantized")
            rows.append(LayerSensitivity(
                name=name, type=layer.layer_type, only_this_quantized=only, all_but_this_quantized=all_but,
                drop_only_this=sign * (float_metric - only), gain_all_but_this=sign * (all_but - quantized_metric),
                weight_sqnr_db=stats.get(name, {}).get("weight_sqnr_db"),
                output_sqnr_db=_output_sqnr(reference[name], outputs),
            ))
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].gain_all_but_this, -rows[i].drop_only_this, i))
    report = SensitivityReport(
        layers=[rows[i] for i in order], float_metric=float_metric, quantized_metric=quantized_metric,
        method=method, mode=mode, metric_name=metric_name, eval_batches=len(batches),
        eval_samples=int(sum(int(images.shape[0]) for images, _ in batches)),
        calib_batches=calib_batches,
    )
    return report
