#!/usr/bin/env bash
# What the GPU machine runs: every GPU-only check in one call, the most valuable first, under a time budget
# (see gpu_check.py).
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh --budget 540   # to $OUT / --out-dir
# That machine has no internet and lacks some wheels (datasets, deepspeed, ...): fetch them beforehand, here,
# with the shared gpu-wheels.sh script (it writes ./.whl) and carry `.whl` to the device run.
# HH_DATA (an HH-RLHF .jsonl(.gz) file or directory), when it exists, gives the e2e section its prompt lengths.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
HH_DATA=${HH_DATA:-../shared/data/hh-rlhf}
if [ -e "$HH_DATA" ]; then
  set -- --hh-data "$HH_DATA" "$@"
fi
# RLHF_FAST_COMPILE_CACHE: a directory holding an earlier run's compile_cache.bin/.json (carried in the tree, e.g.
# .compile_cache/, ignored by git): the e2e section starts from it. Every run saves its own into the output folder.
if [ -n "${RLHF_FAST_COMPILE_CACHE:-}" ]; then
  set -- --compile-cache "$RLHF_FAST_COMPILE_CACHE" "$@"
fi
exec python3 -m benchmarks.gpu_check "$@"
