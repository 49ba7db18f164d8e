"""`rlhf-fast generate`: prompts from flags and a file, seeded output, clear errors."""


from rlhf_fast.cli import main


def test_cli_generate_preset(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond\n")
    args = ["generate", "--model", "tiny", "--prompt", "Hello", "--prompts-file", str(prompts),
            "--max-new-tokens", "7", "--temperature", "0.8", "--top-k", "20", "--seed", "3",
            "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("=== ")] == [
        "=== Hello", "=== first prompt", "=== second"]
    assert main(args) == 0
    assert capsys.readouterr().out == out  # seeded


def test_cli_generate_bad_args(user_error):
    line = user_error(["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "500", "--device", "cpu"])
    assert "exceeds the model's n_positions" in line
    assert "give --prompt" in user_error(["generate", "--model", "tiny", "--device", "cpu"])
