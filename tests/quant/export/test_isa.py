"""qtrainer.quant.export.isa: the int8 ISA from the CPU flags."""
from __future__ import annotations

import pytest

from qtrainer.quant.export.isa import INT8_ISAS, has_vnni, int8_isa, isa_from_flags


@pytest.mark.parametrize("flags, isa", [
    ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "amx"),
    ({"avx2", "avx512f", "avx512_vnni"}, "avx512_vnni"),
    ({"avx2", "avx_vnni"}, "avx_vnni"),
    ({"avx2", "fma"}, "avx2"),
    ({"sse4_2"}, "none"),
])
def test_the_best_int8_isa_is_read_from_the_flags(flags, isa):
    assert isa_from_flags(flags) == isa


def test_this_cpu_matches_its_own_flags():
    with open("/proc/cpuinfo") as handle:
        flags = set(next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split())
    assert int8_isa() in INT8_ISAS and int8_isa() == isa_from_flags(flags)
    assert has_vnni() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
