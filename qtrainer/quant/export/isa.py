"""The CPU's int8 instruction set, which decides how oneDNN's int8 kernels behave.

* ``"amx"`` (AMX-INT8), ``"avx512_vnni"``, ``"avx_vnni"``: u8 x s8 products are summed exactly in
  32 bits, and s8 inputs are exact.
* ``"avx2"``: no VNNI: u8 x s8 pairs are summed in 16 bits and saturate (hence the u8 headroom of
  the export), and s8 inputs run on 7-bit weights.
* ``"none"``: no AVX2; oneDNN falls back to slow reference int8 kernels, if any.

An export is written for a *target* (``EXPORT_TARGETS``): ``"vnni"`` (any VNNI or AMX CPU) puts an
unsigned 8-bit activation on the whole u8 grid of its threshold (codes 0..255 on ``[0, T]``);
``"avx2"`` and ``"portable"`` keep the headroom CPUs without VNNI need (codes of ``[0, T]`` are
0..127, so no pair of u8 x s8 products overflows 16 bits), which is correct on every x86-64 CPU
with AVX2. ``"auto"`` is this CPU's kind.
"""
from __future__ import annotations

import functools

__all__ = ["INT8_ISAS", "EXPORT_TARGETS", "int8_isa", "has_vnni", "resolve_target", "u8_headroom",
           "isa_runs_target", "target_note"]

INT8_ISAS = ("amx", "avx512_vnni", "avx_vnni", "avx2", "none")
EXPORT_TARGETS = ("auto", "vnni", "avx2", "portable")
_VNNI_ISAS = ("amx", "avx512_vnni", "avx_vnni")


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_from_flags(flags: set[str]) -> str:
    """The best int8 ISA named by a set of ``/proc/cpuinfo`` flags (one of ``INT8_ISAS``)."""
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx_vnni" in flags:
        return "avx_vnni"
    if "avx2" in flags:
        return "avx2"
    return "none"


@functools.lru_cache(maxsize=1)
def int8_isa() -> str:
    """This CPU's int8 ISA (``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx2"`` or ``"none"``)."""
    return isa_from_flags(_flags())


def has_vnni() -> bool:
    """True when u8 x s8 int8 products are exact on this CPU (any VNNI or AMX)."""
    return int8_isa() in _VNNI_ISAS


def resolve_target(target: str, isa: str | None = None) -> str:
    """The export target ``target`` stands for on a CPU of int8 ISA ``isa`` (default: this one).

    Returns ``"vnni"``, ``"avx2"`` or ``"portable"``. Raises ``ValueError`` for an unknown name, and
    for ``"auto"`` on a CPU without AVX2 (oneDNN has no fast int8 kernels there: name the target
    CPU, or keep the model in float).
    """
    if not isinstance(target, str) or target not in EXPORT_TARGETS:
        raise ValueError(f"target={target!r} is not valid: use one of {EXPORT_TARGETS}")
    if target != "auto":
        return target
    isa = int8_isa() if isa is None else isa
    if isa == "none":
        raise ValueError(
            "target='auto': this CPU has no AVX2, so oneDNN has no fast int8 kernels here and an int8 "
            "model would be slower than float; export for the CPU you deploy on (target='vnni', "
            "'avx2' or 'portable', with check=False and measure_speed=False) or keep the model in float"
        )
    return "vnni" if isa in _VNNI_ISAS else "avx2"


def u8_headroom(target: str) -> bool:
    """True when unsigned activations keep codes 0..127 for ``[0, T]`` (needed without VNNI)."""
    return resolve_target(target) != "vnni"


def isa_runs_target(isa: str, target: str) -> bool:
    """True when a model exported for ``target`` computes what it was checked to compute on ``isa``."""
    if isa == "none":
        return False
    return isa in _VNNI_ISAS or resolve_target(target, isa) != "vnni"


def target_note(target: str) -> str:
    """One sentence on what a model exported for ``target`` does on each kind of CPU."""
    if resolve_target(target) == "vnni":
        return (
            "exported for VNNI/AMX CPUs (unsigned activations on the full u8 grid): on a CPU with AVX2 "
            "but no VNNI its u8 x s8 products can overflow 16 bits and the outputs are wrong; export "
            "with target='portable' for such CPUs"
        )
    return (
        "portable: correct on every x86-64 CPU with AVX2 (unsigned activations keep the headroom CPUs "
        "without VNNI need; VNNI/AMX CPUs run it exactly too); without AVX2 oneDNN runs int8 slower "
        "than float"
    )
