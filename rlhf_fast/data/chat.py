"""Chat templates: conversational records (lists of {"role", "content"} messages) rendered to text.

GPT-2 has no chat template, so the default renders HH-RLHF's own format, the one the HH data, the sentiment
task and the chat REPL already speak:

- a user turn: "\\n\\nHuman: {content}"; an assistant turn: "\\n\\nAssistant: {content}";
- the generation prompt: "\\n\\nAssistant:" (the reply then starts with its leading space, as in HH data);
- a system message: its content as is, at the very start (no marker: HH has none); only first.

Any other role is an error. `--chat-template` replaces it with a Jinja template (a string, or a path to a
.jinja file) rendered like HF's `apply_chat_template`: sandboxed, trim_blocks + lstrip_blocks, given
`messages` and `add_generation_prompt`, with `raise_exception(message)` available.

A (prompt, completion) pair of message lists becomes text as TRL does it: the prompt rendered with the
generation prompt, the completion = the whole conversation rendered, minus that prompt (so the template must
render the prompt as a prefix of the conversation; it is checked).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_fast.errors import ConfigError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}"
    "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + ' (the default chat template knows system, "
    "user and assistant; give --chat-template for others)') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

WHERE = "data.chat_template"  # the setting a template error points at (the CLI shows it as --chat-template)


class _TemplateRaised(Exception):
    """raise_exception() called by a template: the record is bad (its message says why)."""


def _raise_exception(message):
    raise _TemplateRaised(message)


class ChatTemplate:
    """A compiled chat template; `render` raises ValueError (the record's fault) for what the template refuses."""

    def __init__(self, source: str, name: str = "the default chat template"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.name = source, name
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ConfigError(f"{name}: not a valid Jinja template ({type(e).__name__}: {e})", WHERE) from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except _TemplateRaised as e:
            raise ValueError(f"chat template: {e}") from None
        except (TemplateError, TypeError) as e:  # e.g. an undefined attribute, str + None in the template
            raise ValueError(f"{self.name} failed on this record ({type(e).__name__}: {e})") from None

    def prompt(self, messages: list[dict]) -> str:
        """The prompt text of a conversation: the messages rendered with the generation prompt."""
        return self.render(messages, add_generation_prompt=True)

    def split(self, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
        """(prompt text, completion text) of a conversation cut into prompt and completion messages."""
        prompt_text = self.prompt(prompt)
        whole = self.render(prompt + completion)
        if not whole.startswith(prompt_text):
            raise ValueError(f"{self.name} does not render the prompt (with its generation prompt) as the start of "
                             "the conversation, so the completion cannot be cut from it")
        return prompt_text, whole[len(prompt_text):]


_default: ChatTemplate | None = None


def load_chat_template(spec: str | None = None) -> ChatTemplate:
    """The chat template `spec` names: None → the default (HH format); a path to an existing file (or any
    value ending in .jinja) → that file's template; anything else with Jinja markup → the template itself."""
    global _default
    if spec is None:
        if _default is None:
            _default = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
        return _default
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), name=f"chat template {path}")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read chat template {path} ({type(e).__name__}: {e})", WHERE) from None
    if spec.endswith(".jinja") or not ("{{" in spec or "{%" in spec):
        raise ConfigError(f"chat template file not found: {spec} (give a .jinja file or a Jinja template string)",
                          WHERE)
    return ChatTemplate(spec, name="the --chat-template template")


def check_messages(value, field: str) -> list[dict]:
    """`value` as a non-empty list of {"role": str, "content": str} messages; ValueError names what is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{field}' must be a non-empty list of {{\"role\", \"content\"}} messages, got "
                         f"{type(value).__name__ if value != [] else 'an empty list'}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"'{field}' message {i} must be an object with string 'role' and 'content', got "
                             f"{m!r:.80}")
    return value
