# `make demo` / `make test` on a fresh machine: each creates or reuses .venv and installs what it needs
# (CPU or CUDA torch, then the project with its test extras; skipped while up to date). The work is done by
# scripts/dev.sh, which runs the same without make: `scripts/dev.sh demo`, `scripts/dev.sh test`.
#
#   make demo DEMO_ARGS=--quick                        arguments for `rlhf-fast demo`
#   make test PYTEST_ARGS='tests/test_layering.py -x'  arguments for pytest
#   make setup | lint | info | prebuild | clean-venv
# Set-up knobs (environment or make variables): PYTHON, VENV, EXTRAS, TORCH_CPU, TORCH_CUDA, TRITON.

DEMO_ARGS ?=
PYTEST_ARGS ?=
DEV := bash scripts/dev.sh

export PYTHON VENV EXTRAS TORCH_CPU TORCH_CUDA TRITON

.PHONY: demo test setup lint info prebuild clean-venv

demo:
	$(DEV) demo $(DEMO_ARGS)

test:
	$(DEV) test $(PYTEST_ARGS)

setup:
	$(DEV) setup

lint:
	$(DEV) lint

info:
	$(DEV) info

prebuild:  # JIT-build DeepSpeed's CPU Adam once (~1-3 min on 2 cores; cached in ~/.cache/torch_extensions)
	$(DEV) prebuild

clean-venv:
	rm -rf $(or $(VENV),.venv)
