"""What an export wrote and how its self-check went: ``ExportReport``, one ``LayerExport`` per layer.

``ExportReport.to_dict()`` is the content of ``path.quant.json`` (the format:
``docs/export-format.md``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import paddle

from qtrainer.quant.export.isa import int8_isa, isa_runs_target, target_note

from qtrainer.quant.export.selfcheck import CheckResult

__all__ = ["ExportCheckError", "ExportReport", "LayerExport", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "qtrainer-int8"
FORMAT_VERSION = 1


class ExportCheckError(RuntimeError):
    """The exported model failed its self-check; ``report`` has the numbers. Nothing was written."""

    def __init__(self, message: str, report: "ExportReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LayerExport:
    """How one quantized layer is exported (one entry of the JSON's ``layers``)."""

    name: str
    type: str
    export: str  # 'int8', 'fake-quant' (self-check fallback) or 'float'
    reason: str | None
    act_bits: int
    weight_bits: int
    weight_axis: int | None
    act_pact: bool
    calls: int = 0
    input_min: float | None = None
    act_signed: bool | None = None
    act_scale: float | None = None  # the model's threshold T
    deploy_act_scale: float | None = None  # the Scale written for quantize_linear
    above_threshold: float | None = None  # fraction of sample input values beyond T
    act_clip: bool = False
    shares_input_with: list[str] = field(default_factory=list)
    weight_scale: list[float] | None = None
    deploy_weight_scale: list[float] | None = None
    weight_grid_error: float | None = None
    float_output: bool = False  # int8 conv whose output feeds a residual add: fp32 output (docs/export-format.md)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What ``export_quantized_model`` wrote and how its self-check went."""

    path: str
    files: dict[str, str]
    layers: list[LayerExport]
    input_spec: list[dict[str, Any]]
    check: CheckResult | None = None
    sample_source: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    written: bool = False
    run_id: str | None = None  # the run that wrote it (the callbacks replace their own export on resume)
    sha256: dict[str, str] = field(default_factory=dict)  # {file name: hex}, what the loaders verify
    openvino: dict[str, Any] | None = None  # the OpenVINO IR's check (formats=('paddle', 'openvino'))
    speed: dict[str, Any] | None = None  # int8 vs fp32 latency on this machine (measure_speed)
    onnx: dict[str, Any] | None = None  # the ONNX model's conversion and check (formats=(..., 'onnx'))
    target: str = "portable"  # the CPUs it is for ('vnni', 'avx2', 'portable'; qtrainer.quant.export.isa)
    accuracy: dict[str, Any] | None = None  # the accuracy-aware fallback (max_drop), when asked for

    @property
    def int8_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.export == "int8"]

    @property
    def kept_float(self) -> dict[str, str]:
        """``{name: reason}`` of the layers not running int8 (``'float'`` and ``'fake-quant'``)."""
        return {layer.name: layer.reason or "" for layer in self.layers if layer.export != "int8"}

    @property
    def passed(self) -> bool | None:
        """True/False after a self-check, None when the check was off."""
        return None if self.check is None else self.check.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "paddle": paddle.__version__,
            # the self-check ran here; on another int8 ISA (e.g. AVX2 without VNNI) the numbers differ
            "checked_on": None if self.check is None else {"int8_isa": int8_isa()},
            "target": {"name": self.target, "on_other_cpus": target_note(self.target)},
            "run_id": self.run_id,
            "files": self.files,
            "input_spec": self.input_spec,
            "int8_layers": self.int8_layers,
            "kept_float": self.kept_float,
            "layers": [layer.to_dict() for layer in self.layers],
            "check": None if self.check is None else {
                **self.check.to_dict(),
                "sample_source": self.sample_source,
            },
            "attempts": self.attempts,
            "openvino": self.openvino,
            "speed": self.speed,
            "onnx": self.onnx,
            "accuracy": self.accuracy,
        }

    def summary(self) -> str:
        lines = [
            f"int8 export {self.path}: {len(self.int8_layers)} layer(s) int8, "
            f"{len(self.kept_float)} not int8"
        ]
        for layer in self.layers:
            if layer.export != "int8":
                lines.append(f"  {layer.export}: {layer.name} ({layer.reason})")
        lines.append(f"  target {self.target}: {target_note(self.target)}")
        if self.check is not None and not isa_runs_target(int8_isa(), self.target):
            lines.append(f"  the self-check ran on {int8_isa()}, which computes this target's model differently")
        if self.check is not None:
            lines.append(f"  self-check vs dygraph ({self.sample_source} samples): {self.check.summary()}")
        if self.speed:
            sp = self.speed
            lines.append(f"  speed on this machine ({sp['int8_isa']}, batch {sp['batch']}, {sp['num_threads']} "
                         f"thread(s)): int8 {sp['int8_ms']:.3g} ms, fp32 {sp['fp32_ms']:.3g} ms, x{sp['speedup']}")
        if self.accuracy:
            acc = self.accuracy
            lines.append(f"  accuracy fallback: {acc['metric']} float {acc['float_metric']:.4g}, deployed "
                         f"{acc['deployed_metric']:.4g} (drop {acc['drop']:.4g}, max_drop {acc['max_drop']:g}"
                         f"{'' if acc['met'] else ': NOT met'}) with {len(acc['kept_float'])} layer(s) kept in float")
        for runtime, result, key in (("OpenVINO", self.openvino, "precisions"), ("onnxruntime", self.onnx, None)):
            if not result or result.get("samples") is None:
                continue
            agreement = "n/a" if result.get("top1_agreement") is None else f"{result['top1_agreement']:.2%}"
            int8 = (result.get(key, {}).get("int8_compute") if key else result.get("int8_ops_total"))
            lines.append(f"  {runtime}: rel_l2={result['rel_l2']:.4g} top1_agreement={agreement}, {int8} int8 "
                         f"kernel(s) for {result.get('expected_int8_ops')} int8 layer call(s)"
                         + ("" if result.get("passed") else " -- FAILED"))
        return "\n".join(lines)
