"""xmodal's inference core: media decoding, encoders, the aligned model, index store, search."""

import os

# OpenMP threads that busy-wait between calls make small torch/faiss calls 4-40x slower on a
# shared 2-core machine (benchmarks/RESULTS.md); must be set before torch or faiss load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
