"""Shared test setup.

- Without a GPU, TRITON_INTERPRET=1 is set here, in pytest_configure, before any test imports
  triton: Triton kernels then run on CPU tensors through the interpreter (the kernel test tier).
  Set TRITON_INTERPRET yourself to override (e.g. TRITON_INTERPRET=1 on a GPU machine to run the
  interpreter tier there too).
- GPU tests (marked `gpu`) skip cleanly without CUDA. CUDA is queried in hooks, never at import.
"""

import os

import pytest


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    reason = "needs a CUDA GPU (and TRITON_INTERPRET unset)"
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny-model steps gain nothing from more, and on busy shared cores two threads spin
    against each other (decode steps up to 10x slower were measured on 2 loaded cores). Test modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`; tests/trainers/conftest.py applies it there."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def user_error(capsys):
    """`user_error(argv)`: run `rlhf-fast argv` in-process expecting a user error (exit 2, exactly one stderr line
    `rlhf-fast: error: ...`); returns that line."""
    from rlhf_fast.cli import main

    def run(argv) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rlhf-fast: error: "), lines
        return lines[0]

    return run
