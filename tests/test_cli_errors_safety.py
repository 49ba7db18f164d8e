"""`rlhf-fast ... --resume` on checkpoint files that need full unpickling, in-process through `cli.main`.

A checkpoint file whose pickle needs more than tensors and plain containers (a crafted `optim.pt` whose payload
would create a file; an `rng.pt` in the older format, holding numpy's ndarray) is refused: exit 2, one stderr line
naming the file and `--trust-checkpoint`, no traceback, and nothing in the file runs. With `--trust-checkpoint`
the file loads (the payload runs: that is the consent), with a warning naming it, and the run goes on.
Also `rlhf-fast serve` with a bad limit or key: one line naming the flag.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RUN4 = ["--preset", "tiny", "--attn-backend", "sdpa", "--device", "cpu", "--micro-batch-size", "4", "--eval-size",
        "8", "--synthetic-size", "32", "--no-progress", "--max-steps", "4", "--save-every", "2", "--keep-last", "3",
        "--log-every", "1", "--no-export"]


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT run with checkpoints at steps 2 and 4, trained on one thread as the tests' resumes are (the
    module fixture runs before the function-scoped `one_thread`), so that a resume can match it bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("safety") / "sft"
        assert main(["sft", *RUN4, "--output-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def assert_refused(user_error, argv, *names) -> str:
    """`main(argv)` exits 2 with one stderr line (conftest's `user_error`) naming each of `names`; returns it."""
    line = user_error(argv)
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    return line


def poison_optim(checkpoint: Path, marker: Path) -> Path:
    """The checkpoint's real optimizer state plus a payload entry (ignored by the strategy once loaded)."""
    path = checkpoint / "optim.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, path)
    return path


def old_format_rng(checkpoint: Path) -> Path:
    """rng.pt as checkpoints before the weights_only rule stored it: numpy's state tuple with its ndarray."""
    path = checkpoint / "rng.pt"
    state = torch.load(path, weights_only=True)
    name, keys, *rest = state["numpy"]
    torch.save({**state, "numpy": (name, keys.numpy().astype(np.uint32), *rest)}, path)
    return path


def test_a_checkpoint_loads_under_weights_only(sft_run):
    for path in sorted((sft_run / "checkpoints").glob("step-*/*.pt")):
        torch.load(path, weights_only=True)  # raises on anything but tensors and plain containers


def test_a_pickle_payload_is_refused_unless_trusted(tmp_path, sft_run, user_error, capsys, caplog):
    run = shutil.copytree(sft_run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    optim = poison_optim(run / "checkpoints" / "step-00000004", marker)
    argv = ["sft", *RUN4, "--output-dir", str(run), "--resume"]

    assert_refused(user_error, argv, optim, "--trust-checkpoint")
    assert not marker.exists(), "the payload ran on a plain --resume"
    assert (run / "checkpoints" / "step-00000004").is_dir(), "an unsafe checkpoint is not a corrupt one: left in place"
    assert not list((run / "checkpoints").glob("corrupt-*"))

    with caplog.at_level("WARNING"):
        assert main([*argv, "--trust-checkpoint"]) == 0
    assert marker.exists(), "--trust-checkpoint: the file loads in full"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] + capsys.readouterr().err.splitlines()
    assert any("--trust-checkpoint" in w and str(optim) in w for w in warned), warned


def test_an_older_checkpoint_is_refused_then_resumes_exactly_when_trusted(tmp_path, sft_run, user_error, capsys):
    run = shutil.copytree(sft_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    rng = old_format_rng(run / "checkpoints" / "step-00000002")
    argv = ["sft", *RUN4, "--output-dir", str(run), "--resume"]
    line = assert_refused(user_error, argv, rng, "--trust-checkpoint")
    assert "numpy" in line  # what the file needs

    assert main([*argv, "--trust-checkpoint"]) == 0
    step4 = torch.load(run / "checkpoints" / "step-00000004" / "weights.pt", weights_only=True)
    straight = torch.load(sft_run / "checkpoints" / "step-00000004" / "weights.pt", weights_only=True)
    assert step4.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(step4[name], tensor), name  # the older RNG state restored: the same steps 3 and 4


# --- serve: the guard's flags --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--api-key", ""), ("--max-body-bytes", "0"), ("--max-streams", "0"),
                                         ("--max-streams-per-client", "-1"), ("--served-model-name", " ")])
def test_a_bad_serve_limit_names_its_flag(user_error, flag, value):
    assert_refused(user_error, ["serve", "--model", "tiny", "--device", "cpu", flag, value], flag)
