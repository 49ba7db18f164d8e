"""The commands on exports: `rlhf-fast generate` encodes the prompt with the export's own tokenizer (a byte
export, new or marker-only), and `--export-adapter` writes a PEFT adapter that gives the merged export's logits."""

import json

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data.tokenizer import TOKENIZER_MARKER, ByteTokenizer
from rlhf_fast.model import GPT
from rlhf_fast.trainers.builders import export_model

PROMPTS = ["\n\nHuman: Tell me about Dogs.\n\nAssistant:", "héllo"]
TRAIN = ["--attn-backend", "sdpa", "--device", "cpu", "--micro-batch-size", "2", "--eval-size", "4",
         "--synthetic-size", "8", "--max-steps", "1", "--warmup-steps", "0", "--no-progress", "--lora-rank", "2"]


@pytest.fixture
def tiny_export(tmp_path):
    torch.manual_seed(0)
    return export_model(GPT.from_preset("tiny"), ByteTokenizer(), tmp_path / "export", merge_adapter=None)


@pytest.mark.parametrize("marker_only", [False, True])
def test_generate_encodes_the_prompt_with_the_exports_tokenizer(tiny_export, monkeypatch, capsys, marker_only):
    import rlhf_fast.generation as generation

    if marker_only:  # an export of older versions: the marker, no HF tokenizer files
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tiny_export / name).unlink()
        assert json.loads((tiny_export / TOKENIZER_MARKER).read_text()) == {"tokenizer": "byte"}
    seen = {}
    real = generation.generate

    def spy(model, input_ids, attention_mask, **kw):
        seen["rows"] = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        seen["eos"] = kw["eos_token_id"]
        return real(model, input_ids, attention_mask, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    argv = ["generate", "--model", str(tiny_export), "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*argv, *sum((["--prompt", p] for p in PROMPTS), [])]) == 0
    assert seen["rows"] == [list(p.encode("utf-8")) for p in PROMPTS]  # not [] (issue 27: prompts were ignored)
    assert seen["eos"] == 256
    assert capsys.readouterr().out.count("=== ") == 2


def _logits_equal_through_peft(export_dir, ids):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    adapter = export_dir / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora_b = [t for k, t in load_file(str(adapter / "adapter_model.safetensors")).items() if ".lora_B." in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # trained: B left 0 would compare nothing
    base = GPT2LMHeadModel.from_pretrained(cfg["base_model_name_or_path"])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        merged = GPT2LMHeadModel.from_pretrained(export_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, merged, atol=1e-5, rtol=0)
    return cfg


def test_sft_export_adapter_references_the_model_it_started_from(tiny_export, tmp_path):
    pytest.importorskip("peft")
    run = tmp_path / "sft"
    assert main(["sft", *TRAIN, "--lr", "0.05", "--model", str(tiny_export), "--export-adapter",
                 "--output-dir", str(run)]) == 0
    cfg = _logits_equal_through_peft(run / "export", torch.randint(0, 256, (2, 11)))
    assert cfg["base_model_name_or_path"] == str(tiny_export.resolve())
    assert not (run / "export" / "adapter" / "base").exists()


def test_preset_lora_export_adapter_writes_its_base(tmp_path):
    pytest.importorskip("peft")
    run = tmp_path / "sft"
    assert main(["sft", *TRAIN, "--lr", "0.05", "--preset", "tiny", "--lora", "--export-adapter",
                 "--output-dir", str(run)]) == 0
    cfg = _logits_equal_through_peft(run / "export", torch.randint(0, 256, (2, 11)))
    assert cfg["base_model_name_or_path"] == str((run / "export" / "adapter" / "base").resolve())
