"""``PTQCallback``: static post-training quantization inside ``Trainer.fit``."""
from __future__ import annotations

import logging
import os
from typing import Any

from qtrainer._checks import check_positive_int
from qtrainer.callbacks._quant_export import QuantExportCallback
from qtrainer.callbacks.progress import TQDMProgressBar
from qtrainer.quant.diagnostics.log_stats import QuantStatsLog
from qtrainer.quant.diagnostics.ptq_report import PTQReport
from qtrainer.quant.export.samples import input_spec_for, spread_inputs
from qtrainer.quant.methods.ptq import PTQ, pause_calibration
from qtrainer.quant.methods.ptq_pipeline import calibrate_and_freeze
from qtrainer.quant.transforms.wrap import iter_quanted_layers

__all__ = ["PTQCallback"]

log = logging.getLogger(__name__)


class PTQCallback(QuantExportCallback):
    """Calibrate the module on the training data, validate it quantized, and export it as int8.

    ``trainer.fit(module, train_loader, val_loader, callbacks=[PTQCallback()])`` trains nothing:
    the fit becomes calibration, validation of the quantized model and export. When it acts:

    * ``configure_model`` (before the optimizer exists): with ``fuse`` (default), folds each
      Conv2D -> BatchNorm pair into the convolution (the batch norms' running statistics, i.e.
      eval-mode behaviour; pairs found from the code structure, or given by ``fuse_list``), then
      wraps the quantizable layers with calibrators (``PTQ.quantize(module, inplace=True)``) and
      pauses them, so the Trainer's sanity-check validation does not calibrate. The optimizer is
      then built from the fused parameters, and never steps.
    * ``on_train_start``: runs ``calib_epochs`` passes over ``trainer.train_dataloader`` (at most
      ``calib_batches`` batches each, and at most the Trainer's ``limit_train_batches``) through
      ``module.predict_step`` in eval mode under ``paddle.no_grad()`` -- no loss, no backward, no
      optimizer step, so the weights stay as they were (apart from the fusion). A progress bar is
      shown on rank 0 when the Trainer has an enabled ``TQDMProgressBar``. Data-parallel ranks
      then merge their statistics, the thresholds are frozen and the per-layer report is measured
      on ``check_batches`` validation batches: one engine call,
      ``qtrainer.quant.calibrate_and_freeze``. Then it runs ``trainer.run_validation()``
      (the quantized model's metrics reach the loggers and ``trainer.log_history``),
      logs statistics as ``quant/<stat>/<layer>`` (the chosen threshold and every calibrator's
      threshold on the same histogram, the activation histogram, the fraction clipped, the
      output SQNR, plus the weight statistics QAT logs), so TensorBoard shows each statistic as
      one section across layers, with a custom-scalars layout (one chart per statistic, all
      layers in it) and per-layer bar charts (weight and output SQNR, fraction clipped, scale;
      images ``quant_charts/<stat>``), and sets ``trainer.should_stop`` so that no training
      epoch runs.
    * ``on_fit_start`` (before calibrating): checks the export target as ``QATCallback`` does
      (absent, this run's own after a resume, or ``export_kwargs={'overwrite': True}``; otherwise
      ``FileExistsError`` before any work).
    * ``on_fit_end`` of a successful fit (rank 0): exports with ``PTQ.save_quantized_model`` to
      ``export_dir`` (default ``<log_dir>/export/model``), self-checked against the dygraph model
      on ``check_batches`` validation (else training) batches; writes the per-layer table next
      to it (``model.ptq_report.json`` / ``.csv``, worst layer first; in ``<log_dir>`` when the
      export is disabled). The reports are kept in ``export_report`` and ``report``.

    Args:
        config: the ``PTQ`` arguments as a dict (e.g. ``{'activation_quantizer': 'HistQuantizer',
            'hist_percent': 0.999}``), a ``PTQ`` instance, or None (KL activations, per-channel
            weights).
        calib_epochs: passes over the training loader.
        calib_batches: batches per pass (None = the whole loader).
        export_dir: where to export; ``False`` disables the export.
        input_spec: the export's ``InputSpec`` list (default: from a sample batch).
        fuse: fold Conv2D + BatchNorm pairs before calibrating.
        fuse_list: the pairs to fold (``[[conv_name, bn_name], ...]``, names from
            ``module.named_sublayers()``); None finds them.
        check_batches: batches for the export's self-check and for the per-layer report.
        log_stats: log the statistics to the trainer's loggers.
        report: write the per-layer table.
        bias_correction: after freezing, correct each quantized layer's bias by its mean output
            error on the first ``bias_batches`` calibration batches (all ranks' batches in a
            data-parallel run; ``qtrainer.quant.correct_bias``).
        max_drop: the export's accuracy-aware fallback: the largest loss of top-1 accuracy (or
            ``export_kwargs['metric']``; 0.005 = half a point) the deployed model may have against
            the float model on the first ``eval_batches`` validation batches; the most sensitive
            layers are kept in float until it holds (``export_quantized_model(max_drop=...)``).
        export_kwargs: more arguments for ``qtrainer.quant.export_quantized_model``.

    Raises (at ``fit``): ``ValueError`` when the module is already quantized or the calibration
    loader yields no batch; ``RuntimeError`` when a quantized layer received no calibration data.
    """

    def __init__(
        self,
        config: dict[str, Any] | PTQ | None = None,
        *,
        calib_epochs: int = 1,
        calib_batches: int | None = None,
        export_dir: str | bool | None = None,
        input_spec: list | None = None,
        fuse: bool = True,
        fuse_list: list | None = None,
        check_batches: int = 4,
        log_stats: bool = True,
        report: bool = True,
        bias_correction: bool = False,
        bias_batches: int = 8,
        max_drop: float | None = None,
        eval_batches: int | None = 20,
        export_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(config, PTQ):
            self.ptq = config
        elif config is None or isinstance(config, dict):
            self.ptq = PTQ(**(config or {}))
        else:
            raise TypeError(
                f"PTQCallback(config=...) must be a dict of PTQ arguments, a PTQ or None; got {type(config).__name__}"
            )
        check_positive_int("calib_epochs", calib_epochs, owner="PTQCallback")
        check_positive_int("calib_batches", calib_batches, allow_none=True, owner="PTQCallback")
        if check_batches != 0:  # 0 = no self-check samples, no report
            check_positive_int("check_batches", check_batches, hint=" or 0", owner="PTQCallback")
        check_positive_int("bias_batches", bias_batches, owner="PTQCallback")
        self._set_max_drop(max_drop, eval_batches)
        self.bias_correction = bool(bias_correction)
        self.bias_batches = bias_batches
        self.calib_epochs = calib_epochs
        self.calib_batches = calib_batches
        self.export_dir = export_dir
        self.input_spec = input_spec
        self.fuse = bool(fuse)
        self.fuse_list = fuse_list
        self.check_batches = check_batches
        self.log_stats = bool(log_stats)
        self._stats_log = QuantStatsLog()
        self.write_report = bool(report)
        self.export_kwargs = dict(export_kwargs or {})
        self.quantized_layers: list[str] = []
        self.fused_pairs: list[tuple[str, str]] = []
        self.calibration_batches = 0
        self.validation_metrics: dict[str, float] = {}
        self.report: PTQReport | None = None
        self.report_files: dict[str, str] = {}
        self.export_report = None
        self.bias_correction_result = None
        self.run_id: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.ptq.to_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.ptq.to_dict(), "quantized_layers": list(self.quantized_layers),
                "calibration_batches": self.calibration_batches, "run_id": self.run_id}

    # -- quantize -----------------------------------------------------------------------------
    def configure_model(self, trainer, module) -> None:
        if trainer is not None and trainer.state_stage != "fit":
            log.info("PTQCallback acts during fit only; %s leaves the module as it is", trainer.state_stage)
            return
        existing = [name for name, _ in iter_quanted_layers(module)]
        if existing:
            raise ValueError(
                f"PTQCallback: {type(module).__name__} is already quantized (layers {existing[:5]}); "
                "post-training quantization calibrates a float model -- fit a fresh copy"
            )
        self.ptq.quantize(module, inplace=True, fuse=self.fuse, fuse_list=self.fuse_list)
        self.fused_pairs = list(self.ptq.fused_pairs)
        pause_calibration(module)
        self.quantized_layers = [name for name, _ in iter_quanted_layers(module)]

    # -- calibrate, validate, log ---------------------------------------------------------------
    def on_train_start(self, trainer, module) -> None:
        limit = trainer.num_training_batches
        num_batches = self.calib_batches
        if isinstance(limit, int) or (isinstance(limit, float) and limit != float("inf")):
            num_batches = int(limit) if num_batches is None else min(num_batches, int(limit))
        wants_report = trainer.is_global_zero and (self.log_stats or self.write_report) and self.check_batches
        result = calibrate_and_freeze(
            module,
            trainer.train_dataloader,
            num_batches=num_batches,
            epochs=self.calib_epochs,
            forward=module.predict_step,
            progress=self._progress_enabled(trainer),
            all_reduce=trainer.strategy.all_reduce if trainer.world_size > 1 else None,
            report_inputs=self.sample_loader(trainer) if wants_report else None,
            report_batches=self.check_batches,
            bias_correction=self.bias_correction,
            bias_batches=self.bias_batches,
        )
        self.calibration_batches, self.report = result.batches, result.report
        self.bias_correction_result = result.bias_correction
        self.validation_metrics = trainer.run_validation()
        if self.log_stats and trainer.loggers:
            self._log(trainer, module)
        trainer.should_stop = True

    @staticmethod
    def _progress_enabled(trainer) -> bool:
        return bool(trainer.is_global_zero) and any(
            isinstance(c, TQDMProgressBar) and c.is_enabled for c in trainer.callbacks
        )

    def _log(self, trainer, module) -> None:
        self._stats_log.reset()
        with_report = self.report is not None and trainer.is_global_zero
        scalars = self._stats_log.log(trainer, module, extra_scalars=self.report.scalars() if with_report else None)
        self._stats_log.log_charts(trainer, scalars)
        if not with_report:
            return
        for tag, (edges, counts) in self.report.histograms().items():
            for logger in trainer.loggers:
                logger.log_histogram_raw(tag, edges, counts, trainer.global_step)

    # -- export ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer, module) -> None:
        if trainer.failed or not trainer.is_global_zero:
            return
        prefix = None
        if self.export_dir is not False:
            samples = spread_inputs(self.sample_loader(trainer), self.check_batches)
            input_spec = self.input_spec or (input_spec_for(samples[0]) if samples else None)
            prefix = self.export_prefix(trainer)
            self.export_report = self.ptq.save_quantized_model(
                module, prefix, input_spec=input_spec, sample_inputs=samples or None,
                **{"run_id": self.run_id, **self.accuracy_kwargs(trainer), **self.export_kwargs}
            )
            log.info("PTQ export written to %s", prefix)
        if self.write_report and self.report is not None:
            self.report_files = self.report.write(prefix or os.path.join(trainer.log_dir, "ptq"))
            log.info("PTQ per-layer report: %s", self.report_files["csv"])
