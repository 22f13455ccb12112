"""The CPU's int8 instruction set, which decides how oneDNN's int8 kernels behave.

* ``"amx"`` (AMX-INT8), ``"avx512_vnni"``, ``"avx_vnni"``: u8 x s8 products are summed exactly in
  32 bits, and s8 inputs are exact.
* ``"avx2"``: no VNNI: u8 x s8 pairs are summed in 16 bits and saturate (hence the u8 headroom of
  the export), and s8 inputs run on 7-bit weights.
* ``"none"``: no AVX2; oneDNN falls back to slow reference int8 kernels, if any.
"""
from __future__ import annotations

import functools

__all__ = ["INT8_ISAS", "int8_isa", "has_vnni"]

INT8_ISAS = ("amx", "avx512_vnni", "avx_vnni", "avx2", "none")


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
    return int8_isa() in ("amx", "avx512_vnni", "avx_vnni")
