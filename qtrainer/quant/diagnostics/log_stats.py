"""Send the engine's per-layer statistics to a Trainer's loggers (shared by the callbacks).

``log_quant_stats(trainer, model)`` logs the scalars and weight-scale histograms of one moment
(tags ``quant/<stat>/<layer>``, see ``stats``). ``QuantStatsLog`` does that for a whole run and adds
what makes the numbers readable at a glance:

* a custom-scalars layout (``quant_layout``): one multiline chart per statistic across layers
  (and one per whole-model aggregate), sent with ``trainer.log_layout`` the first time statistics
  are logged (and again only if a statistic appears that the layout lacks);
* bar charts, one bar per layer (``quant_charts``): SQNR, clipped fraction and scale, sent with
  ``trainer.log_image`` as ``quant_charts/<stat>`` when ``log_charts`` is called (the callbacks: at
  each epoch end).

``trainer`` needs ``log_metrics``, ``log_histogram``, ``log_layout`` and ``log_image``
(``qtrainer.Trainer`` forwards them to its loggers; loggers that cannot draw a kind ignore it).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from paddle import nn

from qtrainer.quant.diagnostics.bar_chart import bar_chart
from qtrainer.quant.diagnostics.stats import SUMMARY, collect_quant_stats, flatten_for_logging, split_stat_tag

__all__ = ["CHART_STATS", "QuantStatsLog", "log_quant_stats", "per_layer_values", "quant_charts", "quant_layout"]

# Statistics drawn as per-layer bar charts, when logged: the weight's and (PTQ) the output's SQNR,
# the fraction of activations clipped, the activation scale.
CHART_STATS = ("weight_sqnr_db", "output_sqnr_db", "act_clip_fraction", "act_scale")


def log_quant_stats(trainer, model: nn.Layer, step: int | None = None, prefix: str = "quant") -> dict[str, float]:
    """Log scalars (scales, PACT α, clipped fraction, SQNR) and weight-scale histograms; return the scalars."""
    scalars, histograms = flatten_for_logging(collect_quant_stats(model), prefix=prefix)
    trainer.log_metrics(scalars, step)
    for tag, values in histograms.items():
        trainer.log_histogram(tag, values, step)
    return scalars


def _statistics(tags: Iterable[str], prefix: str) -> list[str]:
    """The statistic names among ``<prefix>/<stat>/<layer>`` tags, in first-seen order."""
    parsed = (split_stat_tag(tag, prefix) for tag in tags)
    return list(dict.fromkeys(stat_layer[0] for stat_layer in parsed if stat_layer))


def quant_layout(tags: Iterable[str], prefix: str = "quant") -> dict[str, dict[str, list]]:
    """A custom-scalars layout for ``tags``: in category ``prefix``, one multiline chart per statistic
    (title ``<stat>``, regex ``<prefix>/<stat>/.*``: every layer); in category ``<prefix>/summary``,
    one chart per aggregate ``<prefix>/summary/<name>`` (their units differ). Empty when no tag is
    a statistic or an aggregate.
    """
    tags = list(tags)
    head = re.escape(prefix)
    layout = {}
    charts = {stat: ["Multiline", [f"{head}/{re.escape(stat)}/.*"]] for stat in _statistics(tags, prefix)}
    if charts:
        layout[prefix] = charts
    summary = f"{prefix}/{SUMMARY}/"
    aggregates = {tag[len(summary):]: ["Multiline", [f"{re.escape(tag)}$"]] for tag in tags if tag.startswith(summary)}
    if aggregates:
        layout[f"{prefix}/{SUMMARY}"] = aggregates
    return layout


def per_layer_values(scalars: Mapping[str, float], stat: str, prefix: str = "quant") -> tuple[list[str], list[float]]:
    """``(layers, values)`` of one statistic among ``scalars``, in the order the tags come."""
    pairs = [(parsed[1], float(value)) for tag, value in scalars.items()
             if (parsed := split_stat_tag(tag, prefix)) is not None and parsed[0] == stat]
    return [layer for layer, _ in pairs], [value for _, value in pairs]


def quant_charts(scalars: Mapping[str, float], prefix: str = "quant", chart_prefix: str = "quant_charts",
                 stats: Sequence[str] = CHART_STATS) -> dict[str, np.ndarray]:
    """``{<chart_prefix>/<stat>: HxWx3 uint8 bar chart}``, one bar per layer, for each of ``stats``
    present in ``scalars`` (non-finite values, e.g. the infinite SQNR of an exact weight, read ``n/a``)."""
    charts = {}
    for stat in stats:
        layers, values = per_layer_values(scalars, stat, prefix)
        if layers:
            charts[f"{chart_prefix}/{stat}"] = bar_chart(layers, values, title=f"{stat} per layer")
    return charts


class QuantStatsLog:
    """The statistics logging of one run: scalars and histograms on every ``log``, the layout when
    it is first needed, bar charts on ``log_charts``. ``reset`` starts a new run (layout again).

    Args:
        prefix: first part of the statistic tags (``<prefix>/<stat>/<layer>``).
        chart_prefix: first part of the chart image tags (``<chart_prefix>/<stat>``).
        chart_stats: the statistics drawn by ``log_charts`` (those logged; others are skipped).
    """

    def __init__(self, prefix: str = "quant", chart_prefix: str = "quant_charts",
                 chart_stats: Sequence[str] = CHART_STATS) -> None:
        self.prefix = prefix
        self.chart_prefix = chart_prefix
        self.chart_stats = tuple(chart_stats)
        self._layout: dict[str, dict[str, list]] = {}  # the layout written so far

    def reset(self) -> None:
        """Forget the layout written, so the next ``log`` writes it again (a new run)."""
        self._layout = {}

    def log(self, trainer, model: nn.Layer, step: int | None = None,
            extra_scalars: Mapping[str, float] | None = None) -> dict[str, float]:
        """Log ``model``'s statistics and ``extra_scalars`` (e.g. a PTQ report's ``scalars()``, same
        tag scheme) at ``step`` (None: the trainer's global step); write the layout if it lacks a
        statistic; return all the scalars."""
        scalars = log_quant_stats(trainer, model, step, self.prefix)
        if extra_scalars:
            trainer.log_metrics(dict(extra_scalars), step)
            scalars = {**scalars, **extra_scalars}
        self._log_layout(trainer, scalars)
        return scalars

    def log_charts(self, trainer, scalars: Mapping[str, float], step: int | None = None) -> list[str]:
        """Send the per-layer bar charts of ``scalars`` (what ``log`` returned); return their tags."""
        if not getattr(trainer, "is_global_zero", True):  # only rank 0 writes: do not draw elsewhere
            return []
        charts = quant_charts(scalars, self.prefix, self.chart_prefix, self.chart_stats)
        for tag, image in charts.items():
            trainer.log_image(tag, image, step)
        return list(charts)

    def _log_layout(self, trainer, scalars: Mapping[str, Any]) -> None:
        fresh = quant_layout(scalars, self.prefix)
        if all(set(charts) <= set(self._layout.get(category, {})) for category, charts in fresh.items()):
            return
        for category, charts in fresh.items():  # the charts written before stay, in their order
            self._layout.setdefault(category, {}).update(charts)
        trainer.log_layout({category: dict(charts) for category, charts in self._layout.items()})
