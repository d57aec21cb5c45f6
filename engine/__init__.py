"""xmodal's inference core: media decoding, encoders, the aligned model, index store, search."""

import os
import sys

# OpenMP threads that busy-wait between calls make small torch/faiss calls 4-40x slower on a
# shared 2-core machine (benchmarks/RESULTS.md); must be set before torch or faiss load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load_ctranslate2_first() -> None:
    """Load CTranslate2's library (and its own copy of libgomp) before torch loads.

    Loaded after torch, CTranslate2 binds to torch's libgomp; its threads then count against
    torch's, libgomp finds more threads than cores and stops spinning for good, and every
    torch call after the first Whisper pass runs ~1.8x slower whenever spinning was allowed
    (OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT). Loading it first keeps the two runtimes apart
    (tests/engine/test_threads.py). A dlopen only (~4 ms): nothing of ctranslate2 is imported.
    """
    if "torch" in sys.modules:
        return  # too late to matter
    import ctypes
    import glob
    import importlib.util

    spec = importlib.util.find_spec("ctranslate2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for library in glob.glob(os.path.join(folder, "_ext*.so")):
            ctypes.CDLL(library)


_load_ctranslate2_first()
