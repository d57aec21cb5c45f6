"""engine.cpu: what /proc/cpuinfo says, and the int8 recipe that follows from it."""

from engine import cpu


def test_int8_cpu_reads_the_cpu_flags(monkeypatch, tmp_path, request):
    import platform

    request.addfinalizer(cpu.int8_cpu.cache_clear)  # what this CPU says, again
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    cpu.int8_cpu.cache_clear()
    assert cpu.int8_cpu() == "other"  # not x86: no u8 x s8 saturation to avoid
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "CPUINFO", cpuinfo)
    for flags, expected in (("fpu avx2 fma", "x86"), ("avx2 avx512f avx512_vnni", "vnni"),
                            ("avx2 avx_vnni", "vnni")):  # fmt: skip
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        cpu.int8_cpu.cache_clear()
        assert cpu.int8_cpu() == expected
    cpuinfo.unlink()
    cpu.int8_cpu.cache_clear()
    assert cpu.int8_cpu() == "x86"  # an x86 CPU that cannot be asked: the safe recipe
