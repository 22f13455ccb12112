"""Send the engine's per-layer scale statistics to a Trainer's loggers (shared by the callbacks)."""
from __future__ import annotations

from paddle import nn

from qtrainer.quant.diagnostics.stats import collect_quant_stats, flatten_for_logging

__all__ = ["log_quant_stats"]


def log_quant_stats(trainer, model: nn.Layer, step: int | None = None, prefix: str = "quant") -> dict[str, float]:
    """Log scalars (scales, PACT α, clipped fraction, SQNR) and weight-scale histograms; return the scalars."""
    scalars, histograms = flatten_for_logging(collect_quant_stats(model), prefix=prefix)
    trainer.log_metrics(scalars, step)
    for tag, values in histograms.items():
        trainer.log_histogram(tag, values, step)
    return scalars
