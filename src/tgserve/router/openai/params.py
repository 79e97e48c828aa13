"""OpenAI requests to validated internal requests: parameter mapping, refusals, choices to run."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tgserve.router.chat import ChatTemplate, RequestError, render
from tgserve.router.errors import ValidationError
from tgserve.router.native.schemas import GenerateParameters
from tgserve.router.native.validation import Limits, reseeded, validate
from tgserve.router.openai.decode import ChoiceDecoder
from tgserve.router.openai.schemas import (
    CHAT_UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    _Sampling,
)
from tgserve.router.terms import RequestTerms
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.types import ValidRequest

_U64 = 2**64

# Fill-in-the-middle token families (prefix, suffix, middle); the prompt is laid out P-S-M.
_FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),
)


@dataclass(frozen=True)
class ChoicePlan:
    """One backend request: the `index`-th sequence, generated for prompt `prompt_index`."""

    index: int
    prompt_index: int
    request: ValidRequest
    echo: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything a route needs to run a request and to shape its answer."""

    choices: tuple[ChoicePlan, ...]
    prompt_tokens: int
    n: int  # choices returned per prompt (best_of may run more)
    stream: bool
    include_usage: bool
    want_logprobs: bool
    stops: tuple[str, ...]
    discard_generated: bool = False
    characters: int = 0

    def decoder(self) -> ChoiceDecoder:
        return ChoiceDecoder(self.stops, self.want_logprobs, self.discard_generated)

    def with_terms(self, terms: RequestTerms) -> Plan:
        """Every choice under the HTTP request's deadline and cache salt."""
        choices = tuple(replace(c, request=terms.apply(c.request)) for c in self.choices)
        return replace(self, choices=choices)


@dataclass(frozen=True)
class PlanLimits:
    limits: Limits
    max_choices: int  # a request may not take more permits than the server has
    max_prompts: int  # --max-client-batch-size


# ---------------------------------------------------------------- refusals


def _asks_nothing(name: str, value: Any, req: ChatCompletionRequest) -> bool:
    """True for the values of an unsupported field that request no behaviour at all."""
    if value is None:
        return True
    no_tools = not req.tools
    match name:
        case "tools" | "functions":
            return value == []
        case "tool_choice" | "function_call":
            return value == "none" or (value == "auto" and no_tools)
        case "parallel_tool_calls":
            return isinstance(value, bool) and no_tools
        case "response_format":
            return value == {"type": "text"}
        case "modalities":
            return value == ["text"]
        case "store":
            return value is False
        case "service_tier":
            return value in ("auto", "default")
    return False


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    for name in CHAT_UNSUPPORTED:
        if not _asks_nothing(name, getattr(req, name), req):
            raise RequestError(f"`{name}` is not supported by this server", name, "unsupported")


_TGI_NAMES = ("max_new_tokens", "top_n_tokens", "inputs")
# The server flag behind each limit, so the message says what to change.
_LIMIT_FLAGS = (
    ("tokens + `max_new_tokens` must be <=", "--max-total-tokens"),
    ("`inputs` must have less than", "--max-input-tokens"),
    ("`top_n_tokens` must be", "--max-top-n-tokens"),
    ("`stop` supports up to", "--max-stop-sequences"),
)


def openai_validation_error(
    exc: ValidationError, prompt_field: str, top_field: str
) -> RequestError:
    """A TGI validation message with OpenAI's field names, and the field that caused it."""
    names = {"max_new_tokens": "max_tokens", "top_n_tokens": top_field, "inputs": prompt_field}
    message = str(exc)
    for tgi, ours in names.items():
        message = message.replace(f"`{tgi}`", f"`{ours}`")
    original = str(exc)
    flag = next((f for start, f in _LIMIT_FLAGS if start in original), None)
    if flag is not None:
        message += f" (the server's limit: {flag})"
    param = next((names[n] for n in _TGI_NAMES if f"`{n}`" in original), None)
    if param is None:
        found = re.search(r"`([a-z_]+)`", original)
        param = found.group(1) if found else None
    return RequestError(message, param)


# ---------------------------------------------------------------- parameters


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else (stop or [])
    return tuple(s for s in items if s)


def _generate_parameters(
    req: _Sampling, max_new_tokens: int | None, top_n: int, prompt_details: bool
) -> GenerateParameters:
    greedy = req.temperature == 0 or req.top_p == 0
    return GenerateParameters(
        # OpenAI samples unless temperature (or top_p) is 0; TGI's default would be greedy.
        do_sample=not greedy,
        temperature=None if greedy else req.temperature,
        top_p=None if greedy or req.top_p is None else req.top_p,
        top_k=None if greedy or not req.top_k else req.top_k,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        max_new_tokens=max_new_tokens,
        stop=list(_stops(req.stop)),
        seed=req.seed,
        top_n_tokens=top_n,
        decoder_input_details=prompt_details,
        details=True,
        ignore_eos=bool(req.ignore_eos),
        cache_salt=req.cache_salt,
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not re.fullmatch(r"[0-9]+", key) or int(key) >= vocab_size:
            raise RequestError(
                f"logit_bias keys must be token ids below the vocabulary size {vocab_size}; "
                f"got {key!r}",
                "logit_bias",
            )
        out[int(key)] = float(value)
    return out


def _siblings(first: ValidRequest, count: int, seed: int | None) -> list[ValidRequest]:
    """`count` requests for one prompt: distinct seeds (seed, seed+1, ... when one is given)."""
    if seed is None:
        return [first] + [reseeded(first) for _ in range(count - 1)]
    return [
        replace(first, parameters=replace(first.parameters, seed=(seed + i) % _U64))
        for i in range(count)
    ]


def _finish_request(request: ValidRequest, req: _Sampling, vocab_size: int) -> ValidRequest:
    """What GenerateParameters cannot carry: OpenAI's penalties and logit bias.

    `frequency_penalty` went through GenerateParameters for TGI's range check only: OpenAI's
    penalty is count * penalty over the generated tokens, not TGI's length-normalised one.
    """
    params = replace(
        request.parameters,
        frequency_penalty=0.0,
        additive_frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
    )
    return replace(request, parameters=params)


def _validated(
    params: GenerateParameters,
    inputs: str,
    encode: Callable[[str, bool], list[int]],
    limits: Limits,
    add_special_tokens: bool,
    fields: tuple[str, str],
) -> ValidRequest:
    try:
        return validate(params, inputs, encode, limits, add_special_tokens=add_special_tokens)
    except RequestError:
        raise
    except ValidationError as exc:
        raise openai_validation_error(exc, *fields) from exc


def _check_choices(total: int, caps: PlanLimits) -> None:
    if total > caps.max_choices:
        raise RequestError(
            f"this request asks for {total} sequences; the server runs at most {caps.max_choices} "
            "requests at once (--max-concurrent-requests)",
            "n",
        )


# ---------------------------------------------------------------- chat


def chat_plan(
    req: ChatCompletionRequest,
    template: ChatTemplate | None,
    tokenizer: RouterTokenizer,
    caps: PlanLimits,
) -> Plan:
    """Render, tokenize and validate a chat request (blocking: run it on a tokenizer thread)."""
    refuse_unsupported(req)
    n = req.n or 1
    _check_choices(n, caps)
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    if max_tokens == 0:
        raise RequestError("`max_tokens` must be at least 1", "max_tokens")
    if req.top_logprobs and not req.logprobs:
        raise RequestError("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    prompt = render(template, [m.model_dump() for m in req.messages])
    params = _generate_parameters(req, max_tokens, top_n, prompt_details=False)
    first = _validated(
        params, prompt, tokenizer.encode, caps.limits, False, ("messages", "top_logprobs")
    )
    first = _finish_request(first, req, _vocab(tokenizer))
    requests = _siblings(first, n, req.seed)
    return Plan(
        choices=tuple(ChoicePlan(i, 0, r) for i, r in enumerate(requests)),
        prompt_tokens=first.input_length,
        n=n,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        want_logprobs=bool(req.logprobs),
        stops=_stops(req.stop),
        characters=len(prompt),
    )


def chat_prompt(req: ChatCompletionRequest, template: ChatTemplate | None) -> str:
    """The templated text of a chat request (for /chat_tokenize)."""
    return render(template, [m.model_dump() for m in req.messages])


# ---------------------------------------------------------------- completions


def fim_tokens(tokenizer: Any) -> tuple[str, str, str] | None:
    vocab = tokenizer.get_vocab()
    return next((t for t in _FIM_TOKENS if all(x in vocab for x in t)), None)


def _prompts(req: CompletionRequest, caps: PlanLimits) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise RequestError("`prompt` must not be empty", "prompt")
    if len(prompts) > caps.max_prompts:
        raise RequestError(
            f"`prompt` holds {len(prompts)} prompts; at most {caps.max_prompts} are allowed "
            "(--max-client-batch-size)",
            "prompt",
        )
    return prompts


def _with_suffix(prompt: str | list[int], suffix: str, tokenizer: Any) -> str:
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        raise RequestError(
            "`suffix` needs a model with fill-in-the-middle tokens; this one has none", "suffix"
        )
    if not isinstance(prompt, str):
        raise RequestError("`suffix` needs a text prompt, not token ids", "suffix")
    prefix_token, suffix_token, middle_token = tokens
    return f"{prefix_token}{prompt}{suffix_token}{suffix}{middle_token}"


def _best_of(req: CompletionRequest, n: int, caps: PlanLimits) -> int:
    best_of = req.best_of if req.best_of is not None else n
    if best_of < n:
        raise RequestError(f"`best_of` ({best_of}) must be >= `n` ({n})", "best_of")
    if best_of > n and req.stream:
        raise RequestError("`best_of` > `n` is not supported when streaming", "best_of")
    if best_of > n and best_of > caps.limits.max_best_of:
        raise RequestError(
            f"`best_of` must be <= {caps.limits.max_best_of} (--max-best-of). Given: {best_of}",
            "best_of",
        )
    return best_of


def _one_prompt(
    prompt: str | list[int],
    params: GenerateParameters,
    tokenizer: RouterTokenizer,
    caps: PlanLimits,
) -> ValidRequest:
    fields = ("prompt", "logprobs")
    if isinstance(prompt, str):
        return _validated(params, prompt, tokenizer.encode, caps.limits, True, fields)
    vocab = _vocab(tokenizer)
    if not prompt:
        raise RequestError("a token-id prompt must not be empty", "prompt")
    if any(not 0 <= i < vocab for i in prompt):
        raise RequestError(f"token ids in `prompt` must be in [0, {vocab})", "prompt")
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    request = _validated(
        params, text or " ", lambda _t, _s: list(prompt), caps.limits, True, fields
    )
    return replace(request, inputs=text)


def completion_plan(req: CompletionRequest, tokenizer: RouterTokenizer, caps: PlanLimits) -> Plan:
    """Tokenize and validate each prompt (blocking: run it on a tokenizer thread)."""
    n = req.n or 1
    prompts = _prompts(req, caps)
    best_of = _best_of(req, n, caps)
    _check_choices(len(prompts) * best_of, caps)
    if req.suffix and req.echo:
        raise RequestError("`echo` cannot be combined with `suffix`", "echo")
    # max_tokens=0 (with echo: prompt scoring) still runs one step; its token is not returned.
    discard = req.max_tokens == 0
    echo_logprobs = bool(req.echo and req.logprobs is not None)
    params = _generate_parameters(
        req, 1 if discard else req.max_tokens, req.logprobs or 0, prompt_details=echo_logprobs
    )
    choices: list[ChoicePlan] = []
    prompt_tokens = characters = 0
    for p, prompt in enumerate(prompts):
        source = _with_suffix(prompt, req.suffix, tokenizer.tokenizer) if req.suffix else prompt
        first = _finish_request(
            _one_prompt(source, params, tokenizer, caps), req, _vocab(tokenizer)
        )
        prompt_tokens += first.input_length
        characters += len(first.inputs)
        echo = first.inputs if req.echo else None
        for sibling in _siblings(first, best_of, req.seed):
            choices.append(ChoicePlan(len(choices), p, sibling, echo))
    return Plan(
        choices=tuple(choices),
        prompt_tokens=prompt_tokens,
        n=n,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        want_logprobs=req.logprobs is not None,
        stops=_stops(req.stop),
        discard_generated=discard,
        characters=characters,
    )


def _vocab(tokenizer: RouterTokenizer) -> int:
    return len(tokenizer.tokenizer)


def prompt_groups(plan: Plan) -> Sequence[Sequence[ChoicePlan]]:
    """The plan's choices grouped by prompt, in prompt order."""
    groups: dict[int, list[ChoicePlan]] = {}
    for choice in plan.choices:
        groups.setdefault(choice.prompt_index, []).append(choice)
    return [groups[k] for k in sorted(groups)]
