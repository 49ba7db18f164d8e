#!/usr/bin/env bash
# The project's set-up and entry commands in one place; the Makefile's targets call this script, and it
# runs the same without make (a fresh Debian has no make until `apt-get install make`):
#
#   scripts/dev.sh setup            create / reuse .venv and install what the project needs (nothing when up to date)
#   scripts/dev.sh demo [ARGS]      set-up, then `rlhf-fast demo ARGS`
#   scripts/dev.sh test [ARGS]      set-up, then `python -m pytest ARGS`
#   scripts/dev.sh lint             set-up, then ruff on rlhf_fast tests benchmarks
#   scripts/dev.sh info             set-up, then `rlhf-fast info`
#   scripts/dev.sh prebuild         set-up, then JIT-build DeepSpeed's CPU Adam (cached in ~/.cache/torch_extensions)
#
# Torch: the CPU build (TORCH_CPU, default torch==2.13.0: on this project's machines pip takes that CPU wheel from
# disk; elsewhere set e.g. TORCH_CPU='torch --index-url https://download.pytorch.org/whl/cpu') where there is no
# working nvidia-smi, else the CUDA build (TORCH_CUDA, default plain `torch`). Triton is pinned (TRITON): the
# cross-compile record (tests/kernels/cross_compile_record.json) holds that version's figures.
# Then `pip install -e '.[EXTRAS]'`. The set-up is skipped while .venv/.rlhf-fast-setup is newer than
# pyproject.toml and setup.py and records the same torch flavour and extras; `scripts/dev.sh setup --force` redoes it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
EXTRAS=${EXTRAS:-test,deepspeed,dev}  # test: the test suite's packages; deepspeed: its CPU tests; dev: ruff
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}
TORCH_CUDA=${TORCH_CUDA:-torch}
TRITON=${TRITON:-triton==3.9.0}
VPY="$VENV/bin/python"
STAMP="$VENV/.rlhf-fast-setup"

say() { echo "dev.sh: $*" >&2; }

setup() {
  local force=${1:-}
  local flavour=cpu torch_spec=$TORCH_CPU
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    flavour=cuda torch_spec=$TORCH_CUDA
  fi
  local want="torch=$flavour:$torch_spec $TRITON extras=$EXTRAS"
  if [ "$force" != --force ] && [ -x "$VPY" ] && [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] \
     && [ "$STAMP" -nt setup.py ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0  # up to date
  fi
  if [ ! -x "$VPY" ]; then
    say "creating ${VENV#"$PWD"/} with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" || {
      say "'$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
  fi
  say "installing torch ($flavour: $torch_spec) and $TRITON into $VENV"
  # shellcheck disable=SC2086  # the specs may carry pip options (--index-url ...)
  "$VPY" -m pip install -q $torch_spec "$TRITON"
  say "installing the project (-e '.[$EXTRAS]') into $VENV"
  "$VPY" -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$STAMP"
}

# The commands run as if the venv were activated: its bin/ first on PATH (DeepSpeed's JIT build calls `ninja`,
# which the deepspeed extra installs there).
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup "${1:-}" ;;
  demo) setup; exec "$VENV/bin/rlhf-fast" demo "$@" ;;
  test) setup; exec "$VPY" -m pytest "$@" ;;
  lint) setup; exec "$VPY" -m ruff check rlhf_fast tests benchmarks "$@" ;;
  info) setup; exec "$VENV/bin/rlhf-fast" info "$@" ;;
  prebuild)
    setup
    DS_ACCELERATOR=cpu exec "$VPY" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" ;;
  *) echo "usage: scripts/dev.sh setup [--force] | demo [ARGS] | test [PYTEST ARGS] | lint | info | prebuild" >&2
     exit 2 ;;
esac
