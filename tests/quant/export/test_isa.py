"""qtrainer.quant.export.isa: the int8 ISA from the CPU flags."""
from __future__ import annotations

import pytest

from qtrainer.quant.export.isa import (
    INT8_ISAS, has_vnni, int8_isa, isa_from_flags, isa_runs_target, resolve_target, target_note, u8_headroom,
)


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


# ---------------------------------------------------------------------- export targets
@pytest.mark.parametrize("isa, target", [
    ("amx", "vnni"), ("avx512_vnni", "vnni"), ("avx_vnni", "vnni"), ("avx2", "avx2"),
])
def test_auto_is_this_cpus_kind(isa, target):
    assert resolve_target("auto", isa) == target
    for named in ("vnni", "avx2", "portable"):
        assert resolve_target(named, isa) == named  # a named target does not depend on the CPU


def test_auto_refuses_a_cpu_without_avx2_and_names_the_targets():
    with pytest.raises(ValueError, match="no AVX2.*target='vnni', 'avx2' or 'portable'"):
        resolve_target("auto", "none")
    assert resolve_target("portable", "none") == "portable"  # exporting for another CPU is allowed


@pytest.mark.parametrize("bad", ["VNNI", "avx512", "", None, 3])
def test_an_unknown_target_names_the_accepted_ones(bad):
    with pytest.raises(ValueError, match=r"target=.* is not valid: use one of \('auto', 'vnni', 'avx2', 'portable'\)"):
        resolve_target(bad)


def test_only_vnni_targets_drop_the_u8_headroom():
    assert not u8_headroom("vnni") and u8_headroom("avx2") and u8_headroom("portable")
    assert u8_headroom("auto") == (not has_vnni())


def test_which_cpus_compute_what_each_target_was_checked_to_compute():
    for isa in ("amx", "avx512_vnni", "avx_vnni"):
        assert all(isa_runs_target(isa, t) for t in ("vnni", "avx2", "portable"))
    assert not isa_runs_target("avx2", "vnni")  # u8 x s8 pairs saturate in 16 bits there
    assert isa_runs_target("avx2", "avx2") and isa_runs_target("avx2", "portable")
    assert not any(isa_runs_target("none", t) for t in ("vnni", "avx2", "portable"))
    assert "no VNNI" in target_note("vnni") and "portable" in target_note("vnni")
    assert "every x86-64 CPU with AVX2" in target_note("portable") == target_note("avx2")
