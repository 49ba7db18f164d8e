"""Chat templates: the HH-format default, overrides (string, .jinja file), and their errors."""

import pytest

from rlhf_fast.data import DEFAULT_CHAT_TEMPLATE, load_chat_template, parse_hh_record
from rlhf_fast.data.chat import ChatTemplate, check_messages
from rlhf_fast.errors import ConfigError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky colour?"}]
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_default_renders_hh_format():
    t = load_chat_template()
    assert t is load_chat_template(None) and t.source == DEFAULT_CHAT_TEMPLATE
    assert t.render(CHAT) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?"
    assert t.prompt(CHAT) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?\n\nAssistant:"
    prompt, completion = t.split(CHAT[1:], [{"role": "assistant", "content": "Blue."}])
    assert (prompt, completion) == ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?\n\nAssistant:", " Blue.")


def test_default_gives_what_the_hh_parser_gives():
    chosen = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "yes"}]
    t = load_chat_template()
    hh = parse_hh_record({"chosen": t.render(chosen), "rejected": t.render(chosen[:3] + [
        {"role": "assistant", "content": "no"}])})
    assert t.split(chosen[:3], chosen[3:]) == (hh.prompt, hh.chosen)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "x"}], "unknown role tool"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "a system message must come first"),
])
def test_default_refuses_what_it_cannot_render(messages, match):
    with pytest.raises(ValueError, match=match):
        load_chat_template().render(messages)


def test_override_from_string_and_file(tmp_path):
    t = load_chat_template(ZEPHYR)
    assert t.split(CHAT[1:2], CHAT[2:3]) == ("<|user|>\nHi</s>\n<|assistant|>\n", "Hello.</s>\n")
    path = tmp_path / "chat.jinja"
    path.write_text(ZEPHYR)
    assert load_chat_template(str(path)).render(CHAT[:1]) == "<|system|>\nBe brief.</s>\n"
    raising = load_chat_template("{{ raise_exception('no ' + messages[0]['role']) }}")
    with pytest.raises(ValueError, match="chat template: no user"):
        raising.render(CHAT[1:])


def test_a_template_that_does_not_prefix_its_prompt_is_refused():
    # the generation prompt differs from how an assistant turn starts: the completion cannot be cut out
    t = load_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
                           "{% if add_generation_prompt %}[bot]{% endif %}")
    with pytest.raises(ValueError, match="does not render the prompt"):
        t.split(CHAT[1:2], CHAT[2:3])


@pytest.mark.parametrize("spec, match", [
    ("missing.jinja", "chat template file not found: missing.jinja"),
    ("chat_tmpl.txt", "chat template file not found"),
    ("{% for m in messages %}", "not a valid Jinja template"),
])
def test_bad_template_specs_name_the_setting(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_chat_template(spec)
    assert info.value.where == "data.chat_template"


def test_undefined_fields_are_a_record_error():
    t = ChatTemplate("{{ messages[0]['content'] + messages[5]['content'] }}", name="t")
    with pytest.raises(ValueError, match="t failed on this record"):
        t.render(CHAT[:1])


@pytest.mark.parametrize("value, match", [
    ("hi", "'messages' must be a non-empty list .* got str"),
    ([], "got an empty list"),
    ([{"role": "user"}], "message 0 must be an object with string 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, "b"], "message 1 must be"),
])
def test_check_messages(value, match):
    with pytest.raises(ValueError, match=match):
        check_messages(value, "messages")
