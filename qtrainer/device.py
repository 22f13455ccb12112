"""Device, thread and precision settings of a run."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import paddle

from qtrainer._checks import check_positive_int

__all__ = ["resolve_device", "resolve_precision", "Precision", "set_num_threads", "default_num_threads"]

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = {
    "32": "32", "32-true": "32", 32: "32",
    "16-mixed": "16-mixed", "16": "16-mixed", 16: "16-mixed",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
}


def _gpu_count() -> int:
    if not paddle.is_compiled_with_cuda():
        return 0
    return paddle.device.cuda.device_count()


def resolve_device(device: str) -> str:
    """Turn ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"gpu:N"`` into a Paddle device string."""
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use one of: auto, cpu, gpu, gpu:N")
    if device == "auto":
        return "gpu:0" if _gpu_count() > 0 else "cpu"
    if device == "cpu":
        return "cpu"
    count = _gpu_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    if count == 0:
        raise ValueError(
            f"device={device!r} but this Paddle build sees no GPU "
            f"(compiled with CUDA: {paddle.is_compiled_with_cuda()}); available here: auto, cpu"
        )
    if not 0 <= index < count:
        raise ValueError(f"device={device!r} but only gpu:0..gpu:{count - 1} exist")
    return f"gpu:{index}"


@dataclass(frozen=True)
class Precision:
    """How forward passes are cast: ``"32"``, ``"16-mixed"`` (float16 + loss scaling) or ``"bf16-mixed"``."""

    name: str

    @property
    def amp_dtype(self) -> str | None:
        return {"16-mixed": "float16", "bf16-mixed": "bfloat16"}.get(self.name)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "16-mixed"

    def autocast(self):
        """Context manager for forward passes (a no-op in 32-bit)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.amp_dtype, level="O1")


def resolve_precision(precision, device: str) -> Precision:
    """Validate ``precision`` for ``device`` (mixed precision needs hardware support)."""
    accepted = ", ".join(repr(p) for p in PRECISIONS)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of: {accepted}")
    name = PRECISIONS[precision]
    if name != "32":
        place = paddle.CUDAPlace(int(device.split(":")[1])) if device.startswith("gpu") else paddle.CPUPlace()
        check = paddle.amp.is_float16_supported if name == "16-mixed" else paddle.amp.is_bfloat16_supported
        if not check(place):
            raise ValueError(
                f"precision={precision!r} is not supported on device {device!r} by this Paddle build; "
                "use precision='32' here (16-mixed/bf16-mixed need a GPU or CPU that supports them)"
            )
    return Precision(name)


def default_num_threads(local_world_size: int = 1) -> int:
    """The cores this process may use, shared among the processes of this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def set_num_threads(num_threads: int) -> None:
    """Set the CPU math threads of this process (``import paddle`` forces 1 when unset)."""
    check_positive_int("num_threads", num_threads, hint=" (Trainer(num_threads=None): all cores)")
    paddle.base.core.set_num_threads(num_threads)
