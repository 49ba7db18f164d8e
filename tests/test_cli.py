import subprocess
import sys

from rlhf_fast.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "triton", "transformers", "lora_linear", "masked_attention", "attention backends"):
        assert needle in out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rlhf_fast" in out.stdout
