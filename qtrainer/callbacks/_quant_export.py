"""The part ``QATCallback`` and ``PTQCallback`` share: the run id, the export target and ``max_drop``.

A run gets a fresh ``run_id`` at ``setup('fit')``; a resumed run takes its checkpoint's, so the
export it wrote before it was killed may be replaced. The export target is checked at
``on_fit_start``, before any work (``qtrainer.quant.export.files.callback_export_prefix``).
"""
from __future__ import annotations

from typing import Any

from qtrainer._checks import check_positive_int
from qtrainer.callbacks.base import Callback
from qtrainer.quant.export.accuracy_fallback import check_max_drop
from qtrainer.quant.export.files import callback_export_prefix, new_run_id

__all__ = ["QuantExportCallback"]


class QuantExportCallback(Callback):
    """Base of the quantization callbacks: ``run_id``, ``export_dir``, ``export_kwargs``, the target check."""

    export_dir: str | bool | None = None
    export_kwargs: dict[str, Any]
    run_id: str | None = None
    max_drop: float | None = None  # the export's accuracy-aware fallback, on the validation loader
    eval_batches: int | None = 20

    def _set_max_drop(self, max_drop: float | None, eval_batches: int | None) -> None:
        """Check and keep ``max_drop`` / ``eval_batches`` (``export_quantized_model(max_drop=...)``)."""
        check_positive_int("eval_batches", eval_batches, allow_none=True, owner=type(self).__name__)
        check_max_drop(max_drop, [] if max_drop is not None else None, None, "max")
        self.max_drop, self.eval_batches = max_drop, eval_batches

    def accuracy_kwargs(self, trainer) -> dict[str, Any]:
        """The export arguments of the accuracy-aware fallback (empty without ``max_drop``)."""
        if self.max_drop is None:
            return {}
        return {"max_drop": self.max_drop, "eval_loader": trainer.val_dataloaders, "eval_batches": self.eval_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("run_id"), str):  # a resumed run: its own earlier export may be replaced
            self.run_id = state["run_id"]

    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit":
            self.run_id = new_run_id()  # replaced by the checkpoint's when the fit resumes

    def on_fit_start(self, trainer, module) -> None:
        if self.max_drop is not None and self.export_dir is not False and trainer.val_dataloaders is None:
            raise ValueError(f"{type(self).__name__}(max_drop=...) needs a validation loader (trainer.fit(module, "
                             "train_loader, val_loader)): the deployed model is measured on it")
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
