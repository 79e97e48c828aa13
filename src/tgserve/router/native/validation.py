"""Pure request validation with TGI's rules, order and messages: parameters to a ValidRequest."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from tgserve.router.errors import ValidationError
from tgserve.router.native.schemas import GenerateParameters
from tgserve.router.types import SamplingParameters, StoppingParameters, ValidRequest

Encode = Callable[[str, bool], list[int]]

_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    grammar_support: bool = True  # False under --disable-grammar-support


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(message)


def _asks_for_sampling(p: GenerateParameters) -> bool:
    # TGI counts any sampling knob that is *set* as a request for sampling.
    return p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))


def _validate_stream_options(p: GenerateParameters) -> None:
    _check((p.best_of or 1) == 1, "`best_of` != 1 is not supported when streaming tokens")
    _check(
        not p.decoder_input_details,
        "`decoder_input_details` == true is not supported when streaming tokens",
    )


def _validate_best_of(p: GenerateParameters, limits: Limits) -> int:
    best_of = 1 if p.best_of is None else p.best_of
    if limits.max_best_of == 1:
        _check(best_of == 1, "`best_of` != 1 is not allowed for this endpoint")
    _check(
        0 < best_of <= limits.max_best_of,
        f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}",
    )
    _check(best_of == 1 or _asks_for_sampling(p), "you must use sampling when `best_of` is > 1")
    return best_of


def _validate_sampling(p: GenerateParameters) -> None:
    # `not (x > 0)` rather than `x <= 0` so that a NaN can never slip through.
    if p.temperature is not None:
        _check(p.temperature > 0, "`temperature` must be strictly positive")
    if p.repetition_penalty is not None:
        _check(p.repetition_penalty > 0, "`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None:
        _check(-2.0 <= p.frequency_penalty <= 2.0, "`frequency_penalty` must be >= -2.0 and <= 2.0")
    # Unlike TGI, 1.0 is accepted and means "off": it is the documented neutral value.
    if p.top_p is not None:
        _check(0.0 < p.top_p <= 1.0, "`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None:
        _check(0.0 < p.typical_p <= 1.0, "`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None:
        _check(p.top_k > 0, "`top_k` must be strictly positive")


def _validate_counts(p: GenerateParameters, best_of: int, limits: Limits) -> None:
    _check(p.max_new_tokens != 0, "`max_new_tokens` must be strictly positive")
    _check(
        len(p.stop) <= limits.max_stop_sequences,
        f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}",
    )
    _check(best_of == 1 or p.seed is None, "`seed` must not be set when `best_of` > 1")
    top_n = p.top_n_tokens or 0
    _check(
        top_n <= limits.max_top_n_tokens,
        f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}",
    )


def _tokenize(inputs: str, encode: Encode, add_special_tokens: bool) -> list[int]:
    try:
        return list(encode(inputs, add_special_tokens))
    except Exception as exc:  # a tokenizer failure is the client's input problem, not a crash
        raise ValidationError(f"tokenizer error {exc}") from exc


def _resolve_max_new_tokens(requested: int | None, input_length: int, limits: Limits) -> int:
    max_new = limits.max_total_tokens - input_length if requested is None else requested
    total = input_length + max_new
    _check(
        requested is None or total <= limits.max_total_tokens,
        f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
        f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`",
    )
    _check(
        input_length <= limits.max_input_tokens,
        f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}",
    )
    # Only reachable when the limits themselves leave no room (max_input >= max_total).
    _check(
        max_new > 0,
        f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
        f"Given: {input_length} `inputs` tokens and 1 `max_new_tokens`",
    )
    return max_new


def _sampling_parameters(p: GenerateParameters, best_of: int) -> SamplingParameters:
    temperature = 1.0 if p.temperature is None else p.temperature
    top_k = p.top_k or 0
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    # Same rule as the shard (any active warper samples), plus best_of, which requires sampling.
    do_sample = (
        p.do_sample
        or best_of > 1
        or temperature != 1.0
        or top_k != 0
        or top_p < 1.0
        or typical_p < 1.0
    )
    seed = p.seed if p.seed is not None else (random.getrandbits(64) if do_sample else 0)
    return SamplingParameters(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        do_sample=do_sample,
        seed=seed,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        watermark=p.watermark,
    )


def validate(
    params: GenerateParameters,
    inputs: str,
    encode: Encode,
    limits: Limits,
    *,
    stream: bool = False,
    add_special_tokens: bool = True,
) -> ValidRequest:
    """Check every rule in TGI's order and return the tokenized request (raises ValidationError)."""
    if stream:
        _validate_stream_options(params)
    best_of = _validate_best_of(params, limits)
    _validate_sampling(params)
    _validate_counts(params, best_of, limits)
    _check(inputs != "", "`inputs` cannot be empty")
    if params.truncate is not None:
        _check(
            0 < params.truncate <= limits.max_input_tokens,
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
            f"Given: {params.truncate}",
        )
    input_ids = _tokenize(inputs, encode, add_special_tokens)
    if params.truncate is not None:
        input_ids = input_ids[-params.truncate :]  # left truncation keeps the prompt's end
    max_new_tokens = _resolve_max_new_tokens(params.max_new_tokens, len(input_ids), limits)
    # TGI's words when grammars are switched off; without the switch, say that it is tgserve's gap.
    _check(params.grammar is None or limits.grammar_support, "grammar is not supported")
    _check(params.grammar is None, "grammar is not supported yet by tgserve")
    return ValidRequest(
        inputs=inputs,
        input_ids=tuple(input_ids),
        parameters=_sampling_parameters(params, best_of),
        stopping=StoppingParameters(
            max_new_tokens=max_new_tokens,
            stop_sequences=tuple(params.stop),
            ignore_eos_token=params.ignore_eos,
        ),
        top_n_tokens=params.top_n_tokens or 0,
        decoder_input_details=params.decoder_input_details,
        truncate=params.truncate,
        add_special_tokens=add_special_tokens,
        cache_salt=params.cache_salt.encode("utf-8", "surrogatepass") if params.cache_salt else b"",
    )


def reseeded(request: ValidRequest) -> ValidRequest:
    """A copy of a sampling request with a fresh random seed (for best_of siblings)."""
    params = replace(request.parameters, seed=random.getrandbits(64))
    return replace(request, parameters=params)
