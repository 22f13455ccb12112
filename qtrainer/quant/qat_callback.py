"""``QATCallback``: quantization-aware training inside ``Trainer.fit``."""
from __future__ import annotations

import logging
import os
from typing import Any

from qtrainer.callbacks.base import Callback
from qtrainer.quant.config import QuantConfig
from qtrainer.quant.log_stats import log_quant_stats
from qtrainer.quant.samples import first_inputs, input_spec_for
from qtrainer.quant.stats import record_activation_clipping
from qtrainer.quant.wrap import iter_quanted_layers, quantize_model

__all__ = ["QATCallback"]

log = logging.getLogger(__name__)


class QATCallback(Callback):
    """Quantize the module for training, log its scales, and export a deployable int8 model.

    When it acts:

    * ``configure_model`` (before the optimizer exists and before a checkpoint is restored):
      wraps every quantizable layer with fake quanters (``qtrainer.quant.wrap``), so new
      parameters such as PACT's α are trained and the quantization state (scales, moving-average
      accumulators, α) travels in every checkpoint with the weights — a resumed run continues
      exactly. A module that is already quantized (a second ``fit``) is left as it is.
    * every ``trainer.log_every_n_steps`` optimizer steps and at each epoch end: logs per-layer
      statistics under ``quant/<layer>/...`` (activation scale, PACT α, fraction of values
      clipped, weight SQNR, weight-scale histograms) to the trainer's loggers.
    * ``on_fit_end`` of a successful fit (rank 0): exports to ``export_dir`` (default
      ``<log_dir>/export/model``) with ``qtrainer.quant.export.export_quantized_model``, checked
      against the dygraph model on ``check_batches`` batches of the validation (else training)
      loader; the report is kept in ``export_report``.

    Args:
        config: the ``QAT`` config dict (or ``QuantConfig``); None = PaddleSlim's defaults.
        weight_preprocess, act_preprocess, weight_quantize, act_quantize: user classes, as in ``QAT``.
        export_dir: where to export; ``False`` disables the export.
        input_spec: the export's ``InputSpec`` list (default: from a sample batch).
        check_batches: batches used by the export's self-check.
        log_stats: log the scale statistics.
        export_kwargs: more arguments for ``export_quantized_model``.
    """

    def __init__(
        self,
        config: dict[str, Any] | QuantConfig | None = None,
        *,
        weight_preprocess: type | None = None,
        act_preprocess: type | None = None,
        weight_quantize: type | None = None,
        act_quantize: type | None = None,
        export_dir: str | bool | None = None,
        input_spec: list | None = None,
        check_batches: int = 4,
        log_stats: bool = True,
        export_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.config = QuantConfig.from_dict(config)
        self.user_classes = dict(weight_preprocess=weight_preprocess, act_preprocess=act_preprocess,
                                 weight_quantize=weight_quantize, act_quantize=act_quantize)
        self.export_dir = export_dir
        self.input_spec = input_spec
        self.check_batches = check_batches
        self.log_stats = log_stats
        self.export_kwargs = dict(export_kwargs or {})
        self.export_report = None
        self.quantized_layers: list[str] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config.to_dict())

    # -- quantize ---------------------------------------------------------------------------
    def configure_model(self, trainer, module) -> None:
        existing = [name for name, _ in iter_quanted_layers(module)]
        if existing:
            self.quantized_layers = existing
            log.info("module already quantized (%d layers); QATCallback leaves it as it is", len(existing))
            return
        quanted = quantize_model(module, self.config, **self.user_classes)
        self.quantized_layers = [name for name, _ in quanted]
        log.info("QAT: quantized %d layers", len(self.quantized_layers))

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "quantized_layers": list(self.quantized_layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config.to_dict():
            log.warning("QATCallback: the checkpoint was trained with config %s, this run uses %s",
                        state.get("config"), self.config.to_dict())

    # -- statistics ---------------------------------------------------------------------------
    def _logging_step_next(self, trainer) -> bool:
        return self.log_stats and bool(trainer.loggers) and (trainer.global_step + 1) % trainer.log_every_n_steps == 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._logging_step_next(trainer):
            record_activation_clipping(module, True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.log_stats and trainer.loggers and trainer.global_step % trainer.log_every_n_steps == 0:
            log_quant_stats(trainer, module)
        record_activation_clipping(module, False)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.log_stats and trainer.loggers:
            log_quant_stats(trainer, module)

    # -- export -------------------------------------------------------------------------------
    def on_fit_end(self, trainer, module) -> None:
        if trainer.failed or self.export_dir is False or not trainer.is_global_zero:
            return
        from qtrainer.quant.export import export_quantized_model

        loader = trainer.val_dataloaders if trainer.val_dataloaders is not None else trainer.train_dataloader
        samples = first_inputs(loader, self.check_batches)
        input_spec = self.input_spec or (input_spec_for(samples[0]) if samples else None)
        directory = self.export_dir or os.path.join(trainer.log_dir, "export")
        path = os.path.join(directory, "model")
        self.export_report = export_quantized_model(module, path, input_spec=input_spec,
                                                    sample_inputs=samples or None, **self.export_kwargs)
        log.info("QAT export written to %s", path)
