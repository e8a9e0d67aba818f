#!/usr/bin/env bash
# The NTK engine on a GPU in one short go: exactness on this device first, then speed.
#
#   pip install -e ".[dev]" "jax[cuda12]"     # a CUDA build of JAX
#   bash benchmarks/gpu.sh                     # about 15–30 min on one GPU
#
# Stops at once when JAX sees no GPU. "peak MiB" in the tables is host memory; the GPU's own
# peak is in the XLA memory statistics, not measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys

import jax

devices = jax.devices()
if devices[0].platform != "gpu":
    sys.exit(f"no GPU: JAX sees {devices}; install a CUDA build of JAX (pip install 'jax[cuda12]')")
print("devices:", ", ".join(f"{d.device_kind} ({d.platform})" for d in devices), flush=True)
PY
python -m pytest -q -x tests/test_ntk_kernel.py tests/test_ntk_structured.py tests/test_ntk_measure.py
python benchmarks/ntk_speed.py --models mlp cnn resnet18q resnet18 vae tagger gcn actor critic \
    --points 20 100 --implementations auto --repeats 5 --timeout 120
python benchmarks/ntk_speed.py --models mlp cnn resnet18q --points 20 --implementations jacobian ntvp structured \
    --repeats 5 --timeout 60
python benchmarks/ntk_speed.py --protocol --models mlp cnn resnet18q resnet18 tagger gcn actor --timeout 300
