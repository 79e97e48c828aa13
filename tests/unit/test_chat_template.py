"""Chat templates: every source, transformers-identical rendering, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tgserve.router.chat import (
    ChatTemplate,
    RequestError,
    TemplateError,
    load_chat_template,
    normalize_messages,
    render,
)

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = [{"role": "user", "content": "Hi there"}]


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def fast_tokenizer(template: str | None = None) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = template
    return tok


# ---------------------------------------------------------------- sources


def test_folder_sources_in_transformers_order(tmp_path: Path) -> None:
    write_json(
        tmp_path / "tokenizer_config.json",
        {"chat_template": "from-config", "bos_token": {"content": "<B>"}, "eos_token": "<E>"},
    )
    found = load_chat_template(str(tmp_path))
    assert found is not None and found.source == "from-config"
    assert found.special_tokens == {"bos_token": "<B>", "eos_token": "<E>"}
    write_json(tmp_path / "chat_template.json", {"chat_template": "from-json"})
    assert load_chat_template(str(tmp_path)).source == "from-json"  # type: ignore[union-attr]
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    found = load_chat_template(str(tmp_path))
    assert found is not None and found.source == "from-jinja"
    assert found.origin.endswith("chat_template.jinja")


def test_named_templates_pick_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "d"}]
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": templates})
    assert load_chat_template(str(tmp_path)).source == "d"  # type: ignore[union-attr]


def test_tokenizer_config_path_overrides(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "chat_template.jinja").write_text("model's")
    config = write_json(
        tmp_path / "override.json", {"chat_template": "override", "eos_token": "<END>"}
    )
    found = load_chat_template(str(model), fast_tokenizer(), str(config))
    assert found is not None and found.source == "override"
    assert found.special_tokens["eos_token"] == "<END>"
    assert found.special_tokens["bos_token"] == "<s>"  # the tokenizer's, not overridden
    jinja = tmp_path / "t.jinja"
    jinja.write_text("from a file")
    from_file = load_chat_template(str(model), None, str(jinja))
    assert from_file is not None and from_file.source == "from a file"
    # a config without a template still overrides the tokens of the model's template
    tokens_only = write_json(tmp_path / "tokens.json", {"bos_token": "<BOS>"})
    found = load_chat_template(str(model), fast_tokenizer(), str(tokens_only))
    assert found is not None and found.source == "model's"
    assert found.special_tokens["bos_token"] == "<BOS>"


def test_tokenizer_attribute_and_none(tmp_path: Path) -> None:
    found = load_chat_template(str(tmp_path), fast_tokenizer("from-tokenizer"))
    assert found is not None and found.source == "from-tokenizer"
    assert load_chat_template(str(tmp_path), fast_tokenizer(None)) is None
    assert load_chat_template(None, None) is None


def test_gguf_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template(CHATML)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = load_chat_template(str(tmp_path))
    assert found is not None and found.source == CHATML and found.origin == str(path)


# ---------------------------------------------------------------- rendering


def test_render_matches_transformers() -> None:
    tok = fast_tokenizer(CHATML)
    messages = [
        {"role": "system", "content": "Be brief."},
        *USER,
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "héllo 🙂"},
    ]
    template = load_chat_template(None, tok)
    assert template is not None
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render(template, messages) == expected
    assert render(template, messages).startswith("<s><|im_start|>system\nBe brief.")
    assert render(template, USER, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_final_assistant_message_is_continued() -> None:
    template = ChatTemplate(CHATML, "test", {"bos_token": ""})
    text = render(template, [*USER, {"role": "assistant", "content": "The answer is"}])
    assert text.endswith("<|im_start|>assistant\nThe answer is")


def test_template_helpers() -> None:
    source = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    template = ChatTemplate(source, "test", {"eos_token": "</s>"})
    out = render(template, USER)
    assert out.startswith('[{"role": "user", "content": "Hi there"}]|4|</s>')
    with pytest.raises(TemplateError, match="first must be user"):
        render(template, [{"role": "system", "content": "x"}])


def test_sandbox_and_syntax_errors() -> None:
    unsafe = ChatTemplate("{{ messages.__class__.__mro__ }}", "test")
    with pytest.raises(TemplateError):
        render(unsafe, USER)
    broken = ChatTemplate("line one\n{% for m in messages %}", "test")
    with pytest.raises(TemplateError, match="template line 2"):
        render(broken, USER)


def test_missing_template_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match="no chat template") as info:
        render(None, USER)
    assert info.value.param == "messages" and info.value.code == "template_error"


# ---------------------------------------------------------------- messages


def test_normalize_messages() -> None:
    out = normalize_messages(
        [
            {"role": "developer", "content": "rules"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "name": "ann",
            },
            {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ]
    )
    assert out == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "ab", "name": "ann"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "wizard", "content": "x"}, "messages[0].role"),
        ({"role": "assistant", "content": None}, "messages[0].content"),
        (
            {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
            "messages[0].tool_calls",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages[0].content[0]",
        ),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0]"),
        ({"role": "user", "content": "x", "audio": {"id": "a"}}, "messages[0].audio"),
    ],
)
def test_normalize_refusals(message: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        normalize_messages([message])
    assert info.value.param == param
