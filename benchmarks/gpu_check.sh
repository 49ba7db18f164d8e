#!/usr/bin/env bash
# What the GPU machine runs: every GPU-only check in one call, under a time budget (see gpu_check.py).
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh --budget 540   # to $OUT / --out-dir
# That machine has no internet and lacks some wheels (datasets, deepspeed, ...): fetch them beforehand,
# here, with ../shared/scripts/gpu-wheels.sh (writes ./.whl; pass e.g. pytest-benchmark==5.2.3
# py-cpuinfo==9.0.0 as arguments for the bench_lora section) and carry `.whl` to the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
exec python3 benchmarks/gpu_check.py "$@"
