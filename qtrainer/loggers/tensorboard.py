"""``TensorBoardLogger``: scalars, histograms, images, chart layouts and hyperparameters as TensorBoard event files."""
from __future__ import annotations

import itertools
import os
import re
from typing import Any, Mapping

import numpy as np

from qtrainer.loggers import _log_dir
from qtrainer.loggers.base import Logger

__all__ = ["TensorBoardLogger"]

_WRITER_IDS = itertools.count()  # makes every event file name unique (see ``experiment``)
# The HParams plugin knows only UNKNOWN/SUCCESS/FAILURE/RUNNING: an interrupted run did not complete.
_STATUS = {"success": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_FAILURE"}


class TensorBoardLogger(_log_dir.VersionedLogDir, Logger):
    """Write TensorBoard event files (through tensorboardX) to ``save_dir/name/version_N``.

    Nothing is created on disk until the first value is written. ``save`` makes everything
    logged so far durable: tensorboardX's own flush does not drain its write queue, so the
    writer is closed, and the next write opens a new event file in the same run. ``log_hyperparams`` writes
    ``hparams.json`` and the HParams-plugin records into the run itself, so TensorBoard's HParams
    tab shows each version as one session whose metric columns are the final values of every
    scalar logged in it (the list is written by ``finalize``). ``log_image`` draws pictures in the
    Images tab; ``log_layout`` arranges scalars into charts of the Custom Scalars tab.

    Args:
        save_dir: parent directory of the logs; checked at construction (must be creatable/writable).
        name: sub-directory for this experiment ("" for none).
        version: None for the next free ``version_N``; an int ``N`` for ``version_N``; a str for
            that directory name.
        default_hp_metric: when hyperparameters are logged without metrics, log the placeholder
            ``hp_metric = -1`` so the HParams tab has a column to fill. The Trainer fills it at the
            end of a fit (``log_hyperparams(params, final_metrics)``) with the final value of the
            monitored metric (see ``Trainer``), or ``self.log("hp_metric", x)`` sets it; a
            placeholder never filled is left out of the HParams tab's columns.
        writer_kwargs: passed to ``tensorboardX.SummaryWriter`` (e.g. ``flush_secs``, ``max_queue``).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str = "qtrainer_logs",
        version: int | str | None = None,
        default_hp_metric: bool = True,
        **writer_kwargs: Any,
    ) -> None:
        self._init_log_dir(save_dir, name, version)
        self._default_hp_metric = default_hp_metric
        self._writer_kwargs = writer_kwargs
        self._writer = None
        self._dirty = False
        self._hparams: dict[str, Any] | None = None
        self._session_open = False  # hyperparameters logged, end record not yet written
        self._scalar_tags: dict[str, float] = {}  # tag -> last value
        self._hp_metric_is_placeholder = False  # hp_metric holds only the -1 written by log_hyperparams
        self._last_step = 0

    # -- where: name, save_dir, root_dir, version and log_dir come from VersionedLogDir ----

    @property
    def experiment(self):
        """The ``tensorboardX.SummaryWriter``, created (with its directory) on first use."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            _log_dir.make_dirs(self.log_dir, type(self).__name__)
            # tensorboardX names event files by the second and opens them with "wb": a writer
            # created in the same second as the previous one would truncate its file.
            kwargs = dict(self._writer_kwargs)
            kwargs["filename_suffix"] = f"{kwargs.get('filename_suffix', '')}.{os.getpid()}.{next(_WRITER_IDS):06d}"
            self._writer = SummaryWriter(logdir=self.log_dir, **kwargs)
        self._dirty = True
        return self._writer

    # -- writing -------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        owner = type(self).__name__
        values = {k: _log_dir.as_float(k, v, owner) for k, v in metrics.items()}
        if step is not None:
            self._last_step = max(self._last_step, int(step))
        writer = self.experiment
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
            self._scalar_tags[tag] = value
        if "hp_metric" in values:
            self._hp_metric_is_placeholder = False

    def log_histogram(self, tag: str, values: np.ndarray, step: int | None = None) -> None:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size == 0:
            raise ValueError(f"{type(self).__name__}.log_histogram({tag!r}): no values to draw")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{type(self).__name__}.log_histogram({tag!r}): values contain NaN or inf")
        self.experiment.add_histogram(tag, array, step)

    def log_histogram_raw(self, tag: str, bin_edges: np.ndarray, counts: np.ndarray, step: int | None = None) -> None:
        """Draw counts already binned (``len(bin_edges) == len(counts) + 1``, edges increasing).

        TensorBoard's summary also needs the values' min, max, sum and sum of squares; they are
        estimated from the bins (min/max: the outer edges of the non-empty bins; sums: bin centres).
        """
        owner = type(self).__name__
        edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
        weights = np.asarray(counts, dtype=np.float64).reshape(-1)
        if weights.size == 0 or edges.size != weights.size + 1:
            raise ValueError(
                f"{owner}.log_histogram_raw({tag!r}): needs len(bin_edges) == len(counts) + 1 >= 2, got "
                f"{edges.size} edges and {weights.size} counts"
            )
        if not (np.all(np.isfinite(edges)) and np.all(np.isfinite(weights))):
            raise ValueError(f"{owner}.log_histogram_raw({tag!r}): edges or counts contain NaN or inf")
        if np.any(np.diff(edges) <= 0) or np.any(weights < 0):
            raise ValueError(f"{owner}.log_histogram_raw({tag!r}): edges must increase and counts be >= 0")
        nonzero = np.flatnonzero(weights)
        if nonzero.size == 0:
            raise ValueError(f"{owner}.log_histogram_raw({tag!r}): no values to draw (all counts are 0)")
        first, last = int(nonzero[0]), int(nonzero[-1]) + 1
        centres = (edges[:-1] + edges[1:]) / 2.0
        self.experiment.add_histogram_raw(
            tag,
            min=float(edges[first]),
            max=float(edges[last]),
            num=float(weights.sum()),
            sum=float(np.sum(weights * centres)),
            sum_squares=float(np.sum(weights * centres**2)),
            bucket_limits=edges[first + 1:last + 1].tolist(),
            bucket_counts=weights[first:last].tolist(),
            global_step=step,
        )

    def log_image(self, tag: str, image: np.ndarray, step: int | None = None) -> None:
        """Draw an ``HxWxC`` uint8 picture (C = 1, 3 or 4) in the Images tab."""
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
            raise ValueError(
                f"{type(self).__name__}.log_image({tag!r}): needs an HxWxC array with C = 1, 3 or 4, "
                f"got shape {array.shape}"
            )
        if array.dtype != np.uint8:
            raise TypeError(f"{type(self).__name__}.log_image({tag!r}): needs uint8 pixels, got {array.dtype}")
        self.experiment.add_image(tag, array, step, dataformats="HWC")

    def log_layout(self, layout: Mapping[str, Mapping[str, list]]) -> None:
        """Write a custom-scalars layout (see ``Logger.log_layout``); TensorBoard uses the run's latest."""
        checked = _check_layout(layout, type(self).__name__)  # before the writer creates the directory
        self.experiment.add_custom_scalars(checked)

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Record ``params`` (nested dicts are flattened with ``/``) and, if given, final ``metrics``.

        May be called again at the end of a fit with the final metrics: values already logged as
        scalars with the same value are not repeated.
        """
        from tensorboardX.summary import hparams

        owner = type(self).__name__
        if not isinstance(params, Mapping):
            raise TypeError(f"{owner}.log_hyperparams: params must be a mapping, got {type(params).__name__}")
        flat = _flatten(params)
        _log_dir.write_hparams_json(os.path.join(self.log_dir, "hparams.json"), params, owner)
        if flat != self._hparams or not self._session_open:
            self._hparams = flat
            self._session_open = True
            _, session_start, _ = hparams(flat, {})
            self.experiment.file_writer.add_summary(session_start)
        if metrics:
            fresh = {
                k: v for k, v in metrics.items()
                if self._scalar_tags.get(k) != _log_dir.as_float(k, v, owner)
            }
            if fresh:
                self.log_metrics(fresh, step=self._last_step)
        elif self._default_hp_metric and "hp_metric" not in self._scalar_tags:
            self.log_metrics({"hp_metric": -1.0}, step=0)
            self._hp_metric_is_placeholder = True

    def save(self) -> None:
        """Put everything logged so far on disk (closes the writer; a later write reopens)."""
        if self._writer is not None and self._dirty:
            self._close()

    def finalize(self, status: str) -> None:
        """Write the HParams experiment and end records, then close (a later write reopens)."""
        if self._session_open:
            self._write_hparams_end(status)
            self._session_open = False
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._dirty = False

    def _write_hparams_end(self, status: str) -> None:
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboardX.summary import hparams

        columns = dict.fromkeys(self._scalar_tags, 0.0)
        if self._hp_metric_is_placeholder and len(columns) > 1:
            del columns["hp_metric"]  # a column of -1 compares nothing; the real metrics are columns
        experiment, _, _ = hparams(self._hparams, columns)
        end = SessionEndInfo(status=Status.Value(_STATUS.get(status, "STATUS_UNKNOWN")))
        content = HParamsPluginData(session_end_info=end, version=0).SerializeToString()
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
        end_summary = Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])
        writer = self.experiment
        writer.file_writer.add_summary(experiment)
        writer.file_writer.add_summary(end_summary)


_CHART_KINDS = {"Multiline": None, "Margin": 3}  # chart kind -> the number of tags it needs (None: >= 1)


def _check_layout(layout: Any, owner: str) -> dict[str, dict[str, list]]:
    """``layout`` as plain dicts and lists, or a ``ValueError``/``TypeError`` naming the bad entry."""
    where = f"{owner}.log_layout"
    if not isinstance(layout, Mapping) or not layout:
        raise TypeError(f"{where}: layout must be a non-empty mapping {{category: {{title: [kind, tags]}}}}, "
                        f"got {layout!r}")
    out: dict[str, dict[str, list]] = {}
    for category, charts in layout.items():
        if not isinstance(category, str) or not isinstance(charts, Mapping) or not charts:
            raise TypeError(f"{where}: category {category!r} must be a str mapping to a non-empty "
                            f"{{title: [kind, tags]}} dict, got {charts!r}")
        bad_titles = [title for title in charts if not isinstance(title, str) or not title]
        if bad_titles:
            raise TypeError(f"{where}: chart titles must be non-empty str, got {bad_titles!r} in {category!r}")
        out[category] = {title: _check_chart(chart, f"{where}: chart {category!r}/{title!r}")
                         for title, chart in charts.items()}
    return out


def _check_chart(chart: Any, where: str) -> list:
    """One chart ``[kind, tags]`` as a list; ``where`` names it in the error."""
    if not isinstance(chart, (list, tuple)) or len(chart) != 2 or chart[0] not in _CHART_KINDS:
        raise ValueError(f"{where} = {chart!r}: use [kind, [tag regex, ...]] with kind one of "
                         f"{', '.join(map(repr, _CHART_KINDS))}")
    kind, tags = chart
    if not isinstance(tags, (list, tuple)) or not tags or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"{where}: tags must be a non-empty list of non-empty str, got {tags!r}")
    needed = _CHART_KINDS[kind]
    if needed is not None and len(tags) != needed:
        raise ValueError(f"{where}: a {kind} chart needs {needed} tags (value, lower, upper), got {len(tags)}")
    if kind == "Multiline":  # TensorBoard matches each tag of the run against these regexes
        for regex in tags:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"{where}: {regex!r} is not a regex ({exc})") from exc
    return [kind, list(tags)]


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``a/b`` keys; values become bool, int, float or str."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, np.generic):
            flat[name] = value.item()
        else:
            flat[name] = str(value)
    return flat
