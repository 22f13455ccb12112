"""The int8 export: ``export_quantized_model`` and what it is made of (format: ``docs/export-format.md``).

``orchestration`` (the steps), ``plan`` (per layer: int8 or float, scales, weight codes), ``layers``
and ``program`` (what ``paddle.jit.save`` traces), ``selfcheck`` (deployed vs simulated),
``inference`` (oneDNN int8 predictors), ``samples`` (inputs and ``InputSpec``), ``report`` (the
JSON), ``files`` (target check, hashed two-phase publish, verification).
"""
from qtrainer.quant.export.files import check_export_target
from qtrainer.quant.export.orchestration import export_quantized_model
from qtrainer.quant.export.report import ExportCheckError, ExportReport, LayerExport

__all__ = ["export_quantized_model", "check_export_target", "ExportReport", "ExportCheckError", "LayerExport"]
