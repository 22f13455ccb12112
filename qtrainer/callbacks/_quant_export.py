"""The part ``QATCallback`` and ``PTQCallback`` share: the run id and the export target.

A run gets a fresh ``run_id`` at ``setup('fit')``; a resumed run takes its checkpoint's, so the
export it wrote before it was killed may be replaced. The export target is checked at
``on_fit_start``, before any work (``qtrainer.quant.export.files.callback_export_prefix``).
"""
from __future__ import annotations

from typing import Any

from qtrainer.callbacks.base import Callback
from qtrainer.quant.export.files import callback_export_prefix, new_run_id

__all__ = ["QuantExportCallback"]


class QuantExportCallback(Callback):
    """Base of the quantization callbacks: ``run_id``, ``export_dir``, ``export_kwargs``, the target check."""

    export_dir: str | bool | None = None
    export_kwargs: dict[str, Any]
    run_id: str | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("run_id"), str):  # a resumed run: its own earlier export may be replaced
            self.run_id = state["run_id"]

    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit":
            self.run_id = new_run_id()  # replaced by the checkpoint's when the fit resumes

    def on_fit_start(self, trainer, module) -> None:
        if self.export_dir is not False:
            self.export_prefix(trainer)

    def export_prefix(self, trainer) -> str:
        """The checked export prefix (``<export_dir or log_dir/export>/model``)."""
        return callback_export_prefix(type(self).__name__, self.export_dir, trainer.log_dir, self.export_kwargs,
                                      self.run_id)

    @staticmethod
    def sample_loader(trainer):
        """The loader the self-check and the reports sample: validation, else training."""
        return trainer.val_dataloaders if trainer.val_dataloaders is not None else trainer.train_dataloader
