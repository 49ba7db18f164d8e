"""The HH-RLHF dialogue format, shared by `rlhf-fast chat` and the server's chat endpoint, and loading a
model to talk to.

A conversation is OpenAI-style messages, [{"role": "system" | "user" | "assistant", "content": str}];
the model sees "\n\nHuman: ...\n\nAssistant: ..." turns (rlhf_fast.data.hh) ending with "\n\nAssistant:"
for the reply. A system message is put first, as plain text. A reply ends at EOS or where the model starts
the next turn itself ("\n\nHuman:"), which `end_of_reply` finds.
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("system", "user", "assistant")
HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"
TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:")  # the model starting a new turn ends its reply


def check_messages(messages) -> list[dict]:
    """The messages, validated: a non-empty list of {"role", "content"} ending with a user message.
    Raises ValueError naming the offending field (e.g. "messages[2].role")."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with \"role\" and \"content\"")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content: must be a string")
        if m["role"] == "system" and i:
            raise ValueError(f"messages[{i}].role: a system message may only come first")
    if messages[-1]["role"] != "user":
        raise ValueError(f"messages[{len(messages) - 1}].role: the last message must be the user's")
    return messages


def hh_prompt(messages) -> str:
    """The HH-format prompt for the assistant's next reply (messages already checked)."""
    parts = []
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "system":
            parts.append(content)
        elif m["role"] == "user":
            parts.append(HUMAN + content)
        else:
            parts.append(f"{ASSISTANT} {content}")
    return "".join(parts) + ASSISTANT


def end_of_reply(text: str) -> int | None:
    """Index where the model began a new dialogue turn in `text` (its reply ends there), or None."""
    hits = [i for i in (text.find(m) for m in TURN_MARKERS) if i >= 0]
    return min(hits) if hits else None


def load_chat_model(name: str, *, device=None, dtype: str = "float32", seed: int = 0):
    """(model in eval mode, tokenizer, model name) for an `rlhf-fast` export / HF GPT-2 directory, or a
    preset name (random init: a smoke test of the plumbing, not a conversation partner)."""
    import torch

    from rlhf_fast.data import load_tokenizer
    from rlhf_fast.model import GPT, PRESETS
    from rlhf_fast.trainers.ppo import export_tokenizer_name

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name in PRESETS:
        torch.manual_seed(seed)
        model, tokenizer = GPT.from_preset(name), load_tokenizer("byte" if name in ("tiny", "demo") else "gpt2")
    else:
        directory = Path(name)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{name}: not a model directory (no config.json) and not a preset name; "
                                    "pass an export such as runs/demo/ppo/export")
        model = GPT.from_pretrained(str(directory))
        tokenizer = load_tokenizer(export_tokenizer_name(directory))
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer, Path(name).name if name not in PRESETS else name
