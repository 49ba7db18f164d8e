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


def test_help_lists_every_command_and_no_command_says_which_there_are(capsys):
    from rlhf_fast.cli import COMMANDS

    for flag in ("--help", "-h"):  # a "%" in a command's help used to crash argparse's formatting
        try:
            main([flag])
        except SystemExit as e:
            assert e.code == 0
        out = capsys.readouterr().out
        assert "(95% CI)" in " ".join(out.split()) and all(f"\n    {name} " in out for name in COMMANDS)
    assert main([]) == 2  # no command: the same list, on stderr, exit 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rlhf-fast") and all(f"\n    {name} " in err for name in COMMANDS)
