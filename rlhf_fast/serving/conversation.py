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


MAX_CHAR_TOKENS = 4  # tokens an incomplete UTF-8 character may span (BPE or bytes) before it is shown as is


class TextStream:
    """Token ids -> the text pieces of one reply. Holds back an incomplete UTF-8 character (up to
    MAX_CHAR_TOKENS tokens) and a tail that may be the start of a stop string, so no piece has to be taken
    back; ends the reply at a stop string or, with stop_at_turn, at a new dialogue turn."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), stop_at_turn: bool = False):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stop_at_turn = stop_at_turn
        self._watched = stop + (TURN_MARKERS if stop_at_turn else ())
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text handed out
        self.stopped = False
        self._pending: list[int] = []  # tokens of a possibly incomplete character

    def add(self, token_id: int) -> str:
        """The new piece that is safe to show after token_id (maybe ""); sets `stopped` at a stop string."""
        self._pending.append(token_id)
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < MAX_CHAR_TOKENS:
            return ""
        self.text += piece
        self._pending = []
        end = self._stop_index()
        if end is not None:
            self.stopped = True
            return self._take(end)
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything not yet handed out (the reply ended at EOS or max_tokens)."""
        if self.stopped:
            return ""
        self.text += self.tokenizer.decode(self._pending)
        self._pending = []
        end = self._stop_index()
        return self._take(len(self.text) if end is None else end)

    def _stop_index(self) -> int | None:
        # Text before `sent` holds no stop string, nor the start of one (it would have been held back).
        tail = self.text[self.sent:]
        hits = [i for i in (tail.find(s) for s in self.stop) if i >= 0]
        if self.stop_at_turn and (turn := end_of_reply(tail)) is not None:
            hits.append(turn)
        return self.sent + min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that is a proper prefix of a watched string."""
        tail = self.text[self.sent:]
        return max((k for s in self._watched for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


def load_chat_model(name: str, *, device=None, dtype: str = "float32", seed: int = 0):
    """(model in eval mode, tokenizer, model name) for an `rlhf-fast` export / HF GPT-2 directory, or a
    preset name (random init: a smoke test of the plumbing, not a conversation partner). Every failure to
    read the model (a missing directory, corrupt weights, a bad tokenizer marker, an unusable --device) is
    one ValueError / OSError naming it."""
    import torch

    from rlhf_fast.data import load_tokenizer
    from rlhf_fast.model import GPT, PRESETS

    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    if name in PRESETS:
        torch.manual_seed(seed)
        model, tokenizer = GPT.from_preset(name), load_tokenizer("byte" if name in ("tiny", "demo") else "gpt2")
    else:
        directory = Path(name)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{name}: not a model directory (no config.json) and not a preset name; "
                                    "pass an export such as runs/demo/ppo/export")
        try:
            model = GPT.from_pretrained(str(directory))
            tokenizer = load_tokenizer(directory)
        except (ValueError, OSError):
            raise
        except Exception as e:  # corrupt safetensors, a marker without "tokenizer", ...
            raise ValueError(f"{name}: could not load the model ({type(e).__name__}: {e})") from e
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer, Path(name).name if name not in PRESETS else name
