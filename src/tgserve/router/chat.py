"""Chat templates: find a model's template, normalise OpenAI messages, render like transformers."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tgserve.router.errors import ValidationError

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
# OpenAI's `developer` role is the newer name of `system`; templates only know the latter.
_ROLE_ALIASES = {"developer": "system"}
_ROLES = frozenset({"system", "user", "assistant", "tool"})


class RequestError(ValidationError):
    """A request the OpenAI layer refuses: 400 there (naming `param`), 422 on native routes."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class TemplateError(RequestError):
    """The chat template is missing or failed to render these messages."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param, "template_error")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, where it came from, and the special tokens it may print."""

    source: str
    origin: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- loading


def _pick_named(template: Any) -> str | None:
    """tokenizer_config's `chat_template` is a string, a [{name, template}] list or a dict."""
    if isinstance(template, str):
        return template or None
    if isinstance(template, Mapping):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) and chosen else None
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]  # an AddedToken saved as a dict
    return None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    found = {k: _token_text(config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
    return {k: v for k, v in found.items() if v is not None}


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"{path} does not hold a JSON object")
    return data


def _from_config_file(path: Path) -> tuple[str | None, dict[str, str]]:
    """--tokenizer-config-path: a tokenizer_config.json, or a bare .jinja template."""
    if path.suffix == ".jinja":
        return path.read_text(encoding="utf-8") or None, {}
    config = _read_json(path)
    return _pick_named(config.get("chat_template")), _special_tokens(config)


def _from_folder(folder: Path) -> tuple[str | None, str]:
    """transformers' order: chat_template.jinja, chat_template.json, tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None, str(jinja)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = _pick_named(_read_json(path).get("chat_template"))
            if template:
                return template, str(path)
    return None, ""


def template_from_gguf(path: Path) -> str | None:
    """The `tokenizer.chat_template` string of a GGUF file's metadata, if it has one."""
    from gguf import GGUFReader  # imported only for GGUF models

    reader = GGUFReader(str(path))
    entry = reader.fields.get("tokenizer.chat_template")
    if entry is None or not entry.data:
        return None
    return bytes(entry.parts[entry.data[0]]).decode("utf-8") or None


def _ggufs(location: Path) -> list[Path]:
    if location.is_file() and location.suffix == ".gguf":
        return [location]
    return sorted(location.glob("*.gguf")) if location.is_dir() else []


def load_chat_template(
    model_path: str | None, tokenizer: Any = None, config_path: str | None = None
) -> ChatTemplate | None:
    """Find the template: --tokenizer-config-path, the model folder, the tokenizer, a GGUF."""
    tokens = _special_tokens(getattr(tokenizer, "special_tokens_map", None) or {})
    if config_path:
        template, overrides = _from_config_file(Path(config_path))
        tokens |= overrides
        if template:
            return ChatTemplate(template, config_path, tokens)
    folder = Path(model_path) if model_path else None
    if folder is not None and folder.is_dir():
        template, origin = _from_folder(folder)
        if template:
            if (folder / "tokenizer_config.json").is_file():
                tokens = _special_tokens(_read_json(folder / "tokenizer_config.json")) | tokens
            return ChatTemplate(template, origin, tokens)
    template = _pick_named(getattr(tokenizer, "chat_template", None))
    if template:
        return ChatTemplate(template, "tokenizer", tokens)
    for gguf_file in _ggufs(folder) if folder is not None else []:
        template = template_from_gguf(gguf_file)
        if template:
            return ChatTemplate(template, str(gguf_file), tokens)
    return None


# ---------------------------------------------------------------- messages


def _content_text(content: Any, where: str) -> str:
    """A string, or text parts joined (as TGI); other part types need a model that reads them."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                f"content parts of type {kind!r} are not supported: this model reads text only"
                if kind != "text"
                else "a text content part needs a string `text`",
                f"{where}.content[{j}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


def normalize_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """One OpenAI message as a plain dict a template can read, or a RequestError naming why not."""
    where = f"messages[{index}]"
    role = _ROLE_ALIASES.get(message.get("role", ""), message.get("role", ""))
    if role not in _ROLES:
        raise RequestError(
            f"unknown role {message.get('role')!r}: use system, developer, user, assistant or tool",
            f"{where}.role",
        )
    if not _is_empty(message.get("tool_calls")):
        raise RequestError("tool calls are not supported by this server", f"{where}.tool_calls")
    known = {"role", "content", "name", "tool_calls", "tool_call_id"}
    for key, value in message.items():
        if key not in known and not _is_empty(value):
            raise RequestError(f"message field `{key}` is not supported", f"{where}.{key}")
    content = message.get("content")
    if content is None:
        raise RequestError("every message needs `content`", f"{where}.content")
    out: dict[str, Any] = {"role": role, "content": _content_text(content, where)}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [normalize_message(m, i) for i, m in enumerate(messages)]


# ---------------------------------------------------------------- rendering


def _describe(exc: Exception) -> str:
    line = getattr(exc, "lineno", None)
    where = f" (template line {line})" if line else ""
    return f"{exc}{where}"


def render(
    template: ChatTemplate | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`, rendered by transformers' sandboxed Jinja environment.

    As TGI: when the last message is the assistant's, the model continues it (the render stops
    right after that message's text) instead of opening a new turn.
    """
    if template is None:
        raise TemplateError(
            "this model has no chat template: give one with --tokenizer-config-path "
            "(a tokenizer_config.json with `chat_template`, or a .jinja file), "
            "or send a plain prompt to /v1/completions"
        )
    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    plain = normalize_messages(messages)
    continue_final = plain[-1]["role"] == "assistant"
    tokens: dict[str, Any] = dict(template.special_tokens)
    try:
        result: Any = render_jinja_template(
            conversations=[plain],
            chat_template=template.source,
            add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            **tokens,
        )
    except (JinjaError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise TemplateError(f"chat template error: {_describe(exc)}") from exc
    # (rendered conversations, generation indices); transformers annotates it as a str.
    rendered = result[0] if isinstance(result, tuple) else result
    return str(rendered[0] if isinstance(rendered, list) else rendered)
