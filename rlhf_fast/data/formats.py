"""TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats), read as this project's examples.

A file's (or hub split's) format is told from its first record's keys; every record is then parsed as that
format, so a record that lacks a field is an error at its own line. Standard (strings) and conversational
(lists of {"role", "content"} messages, rendered by a chat template: `chat.py`) records may be mixed.

| format                 | keys                             | SFT (prompt → response)  | RM / DPO | RL prompt        |
|------------------------|----------------------------------|--------------------------|----------|------------------|
| language modelling     | {"text"}                         | "" → text (all tokens)   | no       | no               |
| conversational         | {"messages"}                     | → last assistant message | no       | → last user turn |
| prompt-completion      | {"prompt", "completion"}         | prompt → completion      | no       | prompt           |
| prompt-only            | {"prompt"}                       | no                       | no       | prompt           |
| preference             | {"prompt", "chosen", "rejected"} | prompt → chosen          | yes      | prompt           |
| implicit-prompt pref.  | {"chosen", "rejected"}           | prompt → chosen          | yes      | prompt           |

Implicit-prompt pairs are either HH-RLHF dialogues (strings: `hh.parse_hh_record`) or message lists whose
shared leading messages are the prompt. Conversational SFT trains on the last assistant message only (the
earlier turns are its prompt), as this project's examples are one (prompt, response) pair each.
"""

from __future__ import annotations

from rlhf_fast.errors import DataError

from .chat import ChatTemplate, check_messages
from .examples import PreferenceExample, SFTExample
from .hh import parse_hh_record
from .jsonl import LoadReport, as_object, first_record_at, read_jsonl

TEXT, MESSAGES, PROMPT_COMPLETION, PROMPT_ONLY = "language-modelling", "conversational", "prompt-completion", \
    "prompt-only"
PREFERENCE, IMPLICIT_PREFERENCE = "preference", "implicit-prompt preference"
KEYS = {TEXT: '{"text"}', MESSAGES: '{"messages"}', PROMPT_COMPLETION: '{"prompt", "completion"}',
        PROMPT_ONLY: '{"prompt"}', PREFERENCE: '{"prompt", "chosen", "rejected"}',
        IMPLICIT_PREFERENCE: '{"chosen", "rejected"}'}

SFT, PREFERENCES, PROMPTS = "sft", "preferences", "prompts"
ACCEPTS = {  # what each kind of load reads, in the order the one-line error lists them
    SFT: (PROMPT_COMPLETION, MESSAGES, TEXT, PREFERENCE, IMPLICIT_PREFERENCE),
    PREFERENCES: (PREFERENCE, IMPLICIT_PREFERENCE),
    PROMPTS: (PROMPT_ONLY, MESSAGES, PROMPT_COMPLETION, PREFERENCE, IMPLICIT_PREFERENCE),
}
WHAT = {SFT: "SFT data", PREFERENCES: "preference data (rm, dpo)", PROMPTS: "RL prompts"}


def detect_format(record: dict) -> str | None:
    """The format a record's keys name (see the table above), None when they name none. "chosen" or "rejected"
    alone names a preference format too, so that the missing side is reported as such."""
    if "chosen" in record or "rejected" in record:
        return PREFERENCE if "prompt" in record else IMPLICIT_PREFERENCE
    if "messages" in record:
        return MESSAGES
    if "text" in record:
        return TEXT
    if "prompt" in record:
        return PROMPT_COMPLETION if "completion" in record else PROMPT_ONLY
    return None


def accepted(kind: str) -> str:
    return "; ".join(f"{KEYS[f]} ({f})" for f in ACCEPTS[kind])


def parser_for(record: dict, kind: str, template: ChatTemplate, where: str):
    """record → example for every record of a source whose first record is `record`; DataError at `where` when
    its format is unknown or not one `kind` reads."""
    fmt = detect_format(record)
    keys = ", ".join(sorted(map(str, record))) or "none"
    if fmt is None:
        raise DataError(f"no known dataset format (keys: {keys}); {WHAT[kind]} takes {accepted(kind)}", where)
    if fmt not in ACCEPTS[kind]:
        raise DataError(f"{fmt} records ({KEYS[fmt]}) are not {WHAT[kind]}; it takes {accepted(kind)}", where)
    parse = {SFT: _sft, PREFERENCES: _preference, PROMPTS: _prompt}[kind]
    return lambda r: parse(as_object(r), fmt, template)


def read_examples(path, kind: str, template: ChatTemplate, *, skip_bad_examples: bool = False,
                  report: LoadReport | None = None) -> list:
    """The examples of one local .jsonl(.gz) file, in the format its first record names."""
    found = first_record_at(path, skip_bad_examples=skip_bad_examples)
    if found is None:
        return []
    lineno, first = found
    parse = parser_for(first, kind, template, f"{path}:{lineno}")
    return read_jsonl(path, parse, skip_bad_examples=skip_bad_examples, report=report)


# --- one record -------------------------------------------------------------------------------------------


def _fields(record: dict, *names: str):
    missing = [k for k in names if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    return [record[k] for k in names]


def _string(value, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string '{field}', got {type(value).__name__}")
    return value


def _conversational(values: dict) -> bool:
    """True when every field is a message list, False when every one is a string; else ValueError."""
    if all(isinstance(v, list) for v in values.values()):
        return True
    if all(isinstance(v, str) for v in values.values()):
        return False
    kinds = ", ".join(f"'{k}': {type(v).__name__}" for k, v in values.items())
    raise ValueError(f"fields must be all strings or all lists of messages, got {kinds}")


def _preference(record: dict, fmt: str, template: ChatTemplate) -> PreferenceExample:
    if fmt == IMPLICIT_PREFERENCE:
        chosen, rejected = _fields(record, "chosen", "rejected")
        if not _conversational({"chosen": chosen, "rejected": rejected}):
            return parse_hh_record(record)
        return _implicit_conversation(check_messages(chosen, "chosen"), check_messages(rejected, "rejected"),
                                      template)
    prompt, chosen, rejected = _fields(record, "prompt", "chosen", "rejected")
    if not _conversational({"prompt": prompt, "chosen": chosen, "rejected": rejected}):
        return PreferenceExample(prompt, chosen, rejected)
    prompt = check_messages(prompt, "prompt")
    prompt_text, chosen_text = template.split(prompt, check_messages(chosen, "chosen"))
    return PreferenceExample(prompt_text, chosen_text, template.split(prompt, check_messages(rejected, "rejected"))[1])


def _implicit_conversation(chosen: list[dict], rejected: list[dict], template: ChatTemplate) -> PreferenceExample:
    """The shared leading messages are the prompt; the two sides must then go on with an assistant message."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("chosen and rejected share no leading message, so there is no implicit prompt")
    if n == len(chosen) or n == len(rejected):
        raise ValueError("chosen and rejected differ by no message after their shared prompt")
    if chosen[n]["role"] != "assistant" or rejected[n]["role"] != "assistant":
        raise ValueError("after the shared prompt, chosen and rejected must each go on with an assistant message")
    prompt_text, chosen_text = template.split(chosen[:n], chosen[n:])
    return PreferenceExample(prompt_text, chosen_text, template.split(rejected[:n], rejected[n:])[1])


def _sft(record: dict, fmt: str, template: ChatTemplate) -> SFTExample:
    if fmt in (PREFERENCE, IMPLICIT_PREFERENCE):
        return _preference(record, fmt, template).to_sft()
    if fmt == TEXT:
        return SFTExample("", _string(record.get("text"), "text"))
    if fmt == MESSAGES:
        messages = check_messages(record.get("messages"), "messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reply (SFT trains on it)")
        return SFTExample(*template.split(messages[:-1], messages[-1:]))
    prompt, completion = _fields(record, "prompt", "completion")
    if not _conversational({"prompt": prompt, "completion": completion}):
        return SFTExample(prompt, completion)
    return SFTExample(*template.split(check_messages(prompt, "prompt"), check_messages(completion, "completion")))


def _prompt(record: dict, fmt: str, template: ChatTemplate) -> str:
    if fmt in (PREFERENCE, IMPLICIT_PREFERENCE):
        return _preference(record, fmt, template).prompt
    if fmt == MESSAGES:
        messages = check_messages(record.get("messages"), "messages")
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("no user message in 'messages' to prompt with")
        return template.prompt(messages[: last_user + 1])
    prompt = record.get("prompt")
    if not isinstance(prompt, list):
        return _string(prompt, "prompt")
    messages = check_messages(prompt, "prompt")
    if messages[-1]["role"] == "assistant":
        raise ValueError("a conversational prompt must not end with an assistant message")
    return template.prompt(messages)
