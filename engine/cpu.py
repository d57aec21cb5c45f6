"""What this CPU is, from Linux's /proc/cpuinfo: read by the int8 paths (`engine.onnx_graph`,
`engine.text`) and by the benchmarks' machine line. No torch here, so the benchmarks that must
load FAISS before torch can ask too."""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_fields() -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ("model name", "flags", ...);
    empty where there is none."""
    try:
        block = CPUINFO.read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return {}
    return {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())
    }


@functools.cache
def int8_cpu() -> str:
    """What this CPU does with int8 matmuls: "vnni" (x86 with AVX-512 VNNI or AVX VNNI, read
    from Linux's /proc/cpuinfo), "x86" (x86 without, or one that cannot be asked) or "other".

    Without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits, which
    full-range 8-bit weights can overflow; its quantizer's advice there is 7-bit weights
    (`reduce_range`), which int8 exports on "x86" take."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "other"
    flags = cpu_fields().get("flags", "").split()  # none to read: assume the older kind
    return "vnni" if "avx512_vnni" in flags or "avx_vnni" in flags else "x86"
