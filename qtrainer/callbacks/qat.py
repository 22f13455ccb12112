"""``QATCallback``: quantization-aware training inside ``Trainer.fit``."""
from __future__ import annotations

import logging
from typing import Any

from qtrainer._checks import check_positive_int
from qtrainer.callbacks._quant_export import QuantExportCallback
from qtrainer.quant.config import QuantConfig
from qtrainer.quant.diagnostics.log_stats import QuantStatsLog
from qtrainer.quant.diagnostics.stats import record_activation_clipping
from qtrainer.quant.diagnostics.sync import SYNC_MODES, QuantStateSync, scale_spread_metrics
from qtrainer.quant.export.orchestration import export_quantized_model
from qtrainer.quant.export.samples import input_spec_for, spread_inputs
from qtrainer.quant.transforms.bn_freeze import freeze_batch_norm_stats
from qtrainer.quant.transforms.wrap import iter_quanted_layers, quantize_model

__all__ = ["QATCallback"]

log = logging.getLogger(__name__)


class QATCallback(QuantExportCallback):
    """Quantize the module for training, log its scales, and export a deployable int8 model.

    When it acts:

    * ``configure_model`` (before the optimizer exists and before a checkpoint is restored):
      wraps every quantizable layer with fake quanters (``qtrainer.quant.transforms.wrap``), so new
      parameters such as PACT's α are trained and the quantization state (scales, moving-average
      accumulators, α) travels in every checkpoint with the weights — a resumed run continues
      exactly. A module that is already quantized (a second ``fit``) is left as it is.
    * after every training batch of a data-parallel run (``trainer.world_size > 1``): makes the
      quantization state identical on every rank (``qtrainer.quant.diagnostics.sync.QuantStateSync``:
      moving-average scales and their accumulators, abs-max scales, PACT α), so every rank
      trains against the same quantizers and the export holds what all ranks saw; the spread of
      each scale across ranks before that is logged as ``quant/scale_spread/<layer>...``.
      PACT's α gets no gradient during its data-driven warm-up; its layer declares that
      (``may_leave_parameters_unused``) and the data-parallel strategy acts on it.
    * every ``log_stats_every_n_steps`` optimizer steps (default: every
      ``min(10, trainer.log_every_n_steps)``, so a short run still gets a curve) and at each epoch
      end: logs per-layer statistics as ``quant/<stat>/<layer>`` (activation scale, PACT α,
      fraction of values clipped, weight SQNR, weight-scale histograms), so TensorBoard shows each
      statistic as one section across layers, plus ``quant/summary/...`` aggregates. The fraction
      clipped is measured only on those steps and on each epoch's last batch (it costs extra
      passes). The first time, it also writes a custom-scalars layout (``trainer.log_layout``: one
      multiline chart per statistic, all layers in it; one per aggregate). At each epoch end it
      adds bar charts, one bar per layer, of the weight SQNR, the fraction clipped and the
      activation scale (``trainer.log_image``, tags ``quant_charts/<stat>``). Loggers that cannot
      draw layouts or images ignore them.
    * ``on_fit_start`` (after a checkpoint is restored, before any training): checks the export
      target. Absent: fine. Written by this same run (the ``run_id`` kept in the callback's
      checkpoint state matches the one in ``model.quant.json``: a run killed after its export and
      resumed): replaced at the end. Anything else: ``FileExistsError`` now, naming the path and
      the ways out (``export_kwargs={'overwrite': True}``, another ``export_dir``, a versioned
      logger directory), rather than after the training.
    * ``on_fit_end`` of a successful fit (rank 0): exports to ``export_dir`` (default
      ``<log_dir>/export/model``) with ``qtrainer.quant.export_quantized_model``, checked
      against the dygraph model on ``check_batches`` batches of the validation (else training)
      loader; the report is kept in ``export_report``. The JSON records the run's ``run_id``.

    Args:
        config: the ``QAT`` config dict (or ``QuantConfig``); None = PaddleSlim's defaults.
        weight_preprocess, act_preprocess, weight_quantize, act_quantize: user classes, as in ``QAT``.
        export_dir: where to export; ``False`` disables the export.
        input_spec: the export's ``InputSpec`` list (default: from a sample batch).
        check_batches: batches used by the export's self-check.
        log_stats: log the scale statistics.
        log_stats_every_n_steps: optimizer steps between two statistics logs (a positive int);
            None = ``min(10, trainer.log_every_n_steps)``.
        freeze_bn_after_steps: from this optimizer step on, every batch norm normalises with its
            running statistics, which stop changing (its scale and shift still train;
            ``qtrainer.quant.transforms.bn_freeze``); None = never. Re-applied before each training
            step, so a resumed run freezes at the same step.
        max_drop, eval_batches: the export's accuracy-aware fallback, as in ``PTQCallback``: the
            most sensitive layers (``sensitivity(method='qat-state')``) are kept in float until the
            deployed model loses at most ``max_drop`` top-1 against the float model on the first
            ``eval_batches`` validation batches.
        export_kwargs: more arguments for ``export_quantized_model``.
        sync: how ranks combine scales in a data-parallel run: ``"auto"`` (max for abs-max
            scales, mean for moving averages and PACT α), ``"mean"``, ``"max"`` (a moving average
            then equals the one-process run on the global batch), or None to leave each rank
            its own state (not recommended; for comparison).
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
        log_stats_every_n_steps: int | None = None,
        freeze_bn_after_steps: int | None = None,
        max_drop: float | None = None,
        eval_batches: int | None = 20,
        export_kwargs: dict[str, Any] | None = None,
        sync: str | None = "auto",
    ) -> None:
        if sync is not None and sync not in SYNC_MODES:
            raise ValueError(f"QATCallback(sync={sync!r}): use one of {', '.join(map(repr, SYNC_MODES))} or None")
        check_positive_int("log_stats_every_n_steps", log_stats_every_n_steps, allow_none=True,
                           hint=" (None = min(10, trainer.log_every_n_steps))", owner="QATCallback")
        if isinstance(freeze_bn_after_steps, bool) or freeze_bn_after_steps != 0:
            check_positive_int("freeze_bn_after_steps", freeze_bn_after_steps, allow_none=True,
                               hint=", 0 (from the start) or None (never)", owner="QATCallback")
        self.freeze_bn_after_steps = freeze_bn_after_steps
        self._set_max_drop(max_drop, eval_batches)
        self.frozen_batch_norms: list[str] = []
        self.config = QuantConfig.from_dict(config)
        if export_dir is not False:  # refuse now what the export at the end could not deploy
            self.config.require_deployable_bits("QATCallback config")
        self.user_classes = dict(weight_preprocess=weight_preprocess, act_preprocess=act_preprocess,
                                 weight_quantize=weight_quantize, act_quantize=act_quantize)
        self.export_dir = export_dir
        self.input_spec = input_spec
        self.check_batches = check_batches
        self.log_stats = log_stats
        self.log_stats_every_n_steps = log_stats_every_n_steps
        self._stats_log = QuantStatsLog()
        self.export_kwargs = dict(export_kwargs or {})
        self.export_report = None
        self.quantized_layers: list[str] = []
        self.sync = sync
        self._sync: QuantStateSync | None = None
        self.run_id: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config.to_dict())

    # -- quantize ---------------------------------------------------------------------------
    def configure_model(self, trainer, module) -> None:
        existing = [name for name, _ in iter_quanted_layers(module)]
        if existing:
            self.quantized_layers = existing
            log.info("module already quantized (%d layers); QATCallback leaves it as it is", len(existing))
        else:
            quanted = quantize_model(module, self.config, **self.user_classes)
            self.quantized_layers = [name for name, _ in quanted]
            log.info("QAT: quantized %d layers", len(self.quantized_layers))

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "quantized_layers": list(self.quantized_layers),
                "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config.to_dict():
            log.warning("QATCallback: the checkpoint was trained with config %s, this run uses %s",
                        state.get("config"), self.config.to_dict())
        super().load_state_dict(state)

    # -- statistics ---------------------------------------------------------------------------
    def stats_interval(self, trainer) -> int:
        """Optimizer steps between two statistics logs in ``trainer``'s run."""
        if self.log_stats_every_n_steps is not None:
            return self.log_stats_every_n_steps
        return min(10, trainer.log_every_n_steps)

    def _stats_wanted(self, trainer) -> bool:
        return bool(self.log_stats and trainer.loggers)

    def _logs_stats_at(self, trainer, step: int) -> bool:
        return self._stats_wanted(trainer) and step % self.stats_interval(trainer) == 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.freeze_bn_after_steps is not None and trainer.global_step >= self.freeze_bn_after_steps:
            frozen = freeze_batch_norm_stats(module)
            if frozen and not self.frozen_batch_norms:
                log.info("QAT: batch-norm statistics frozen from step %d (%d layers)", trainer.global_step, len(frozen))
            self.frozen_batch_norms = frozen
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches  # the epoch-end statistics follow it
        if self._logs_stats_at(trainer, trainer.global_step + 1) or (last_of_epoch and self._stats_wanted(trainer)):
            record_activation_clipping(module, True)

    def on_train_start(self, trainer, module) -> None:
        self._stats_log.reset()  # a new run: its event files get the layout again
        self._sync = None
        if self.sync is not None and trainer.world_size > 1:
            self._sync = QuantStateSync(module, trainer.strategy.all_gather, mode=self.sync)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        log_now = self._logs_stats_at(trainer, trainer.global_step)
        if self._sync is not None:
            spreads = self._sync()
            if log_now:
                trainer.log_metrics(scale_spread_metrics(spreads))
        if log_now:
            self._stats_log.log(trainer, module)
        record_activation_clipping(module, False)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._stats_wanted(trainer):
            scalars = self._stats_log.log(trainer, module)
            self._stats_log.log_charts(trainer, scalars)

    # -- export -------------------------------------------------------------------------------
    def on_fit_end(self, trainer, module) -> None:
        if trainer.failed or self.export_dir is False or not trainer.is_global_zero:
            return
        samples = spread_inputs(self.sample_loader(trainer), self.check_batches)  # across the loader
        input_spec = self.input_spec or (input_spec_for(samples[0]) if samples else None)
        path = self.export_prefix(trainer)
        kwargs = {"run_id": self.run_id, **self.accuracy_kwargs(trainer), **self.export_kwargs}
        self.export_report = export_quantized_model(module, path, input_spec=input_spec,
                                                    sample_inputs=samples or None, **kwargs)
        log.info("QAT export written to %s", path)
