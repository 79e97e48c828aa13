"""The API's view of inference: concurrency permits, validation, collecting or streaming events."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import anyio

from tgserve.router.errors import IncompleteGenerationStreamError, ValidationError
from tgserve.router.native import schemas
from tgserve.router.native.schemas import GenerateRequest
from tgserve.router.native.validation import Limits, reseeded, validate
from tgserve.router.observe import RequestTracker, Telemetry
from tgserve.router.terms import NO_TERMS, RequestTerms
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.types import (
    EndEvent,
    GeneratedText,
    IncompleteGenerationError,
    InferEvent,
    OverloadedError,
    PrefillEvent,
    Token,
    TokenEvent,
    ValidRequest,
)

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """What the scheduler offers the API; closing the iterator cancels the request."""

    def schedule(self, request: ValidRequest) -> AsyncIterator[InferEvent]: ...

    async def health(self) -> bool: ...


class ConcurrencyLimiter:
    """A non-blocking semaphore: over the limit is an immediate OverloadedError, never a wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def permit(self, count: int = 1) -> Iterator[None]:
        if self.in_flight + count > self.limit:
            raise OverloadedError()
        self.in_flight += count
        try:
            yield
        finally:
            self.in_flight -= count


@dataclass(frozen=True)
class Timings:
    """time.monotonic() stamps of one request's life, from arrival to its last token."""

    start: float
    queued: float
    started: float
    end: float


@dataclass(frozen=True)
class Generation:
    """Everything one backend request produced."""

    request: ValidRequest
    prefill: list[Token]
    tokens: list[Token]
    top_tokens: list[list[Token]]
    generated: GeneratedText
    queued_at: float
    started_at: float

    @property
    def mean_logprob(self) -> float:
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else -math.inf


@dataclass(frozen=True)
class GenerateOutput:
    response: schemas.GenerateResponse
    timings: Timings
    input_length: int
    generated_tokens: int


def _api_token(token: Token) -> schemas.Token:
    return schemas.Token(id=token.id, text=token.text, logprob=token.logprob, special=token.special)


def _api_prefill(token: Token) -> schemas.PrefillToken:
    return schemas.PrefillToken(id=token.id, text=token.text, logprob=token.logprob)


def _api_top_tokens(generation: Generation) -> list[list[schemas.Token]]:
    return [[_api_token(t) for t in tokens] for tokens in generation.top_tokens]


def _seed(request: ValidRequest) -> int | None:
    # TGI echoes a seed only for sampled requests.
    return request.parameters.seed if request.parameters.do_sample else None


class Infer:
    """Validates, admits and runs requests against a backend; knows nothing about HTTP."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: RouterTokenizer,
        limits: Limits,
        max_concurrent_requests: int = 128,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = limits
        self.limiter = ConcurrencyLimiter(max_concurrent_requests)
        self.telemetry = telemetry or Telemetry()

    async def validate(
        self, req: GenerateRequest, *, stream: bool = False, add_special_tokens: bool = True
    ) -> ValidRequest:
        """Validation (tokenization included) runs on the tokenizer's worker threads."""
        return await self.tokenizer.run(self._validate_sync, req, stream, add_special_tokens)

    def _validate_sync(
        self, req: GenerateRequest, stream: bool, add_special_tokens: bool
    ) -> ValidRequest:
        return validate(
            req.parameters,
            req.inputs,
            self.tokenizer.encode,
            self.limits,
            stream=stream,
            add_special_tokens=add_special_tokens,
        )

    async def health(self) -> bool:
        try:
            return bool(await self.backend.health())
        except Exception:
            logger.exception("backend health check failed")
            return False

    async def readiness(self) -> str | None:
        """Why no request should be sent here now (None: ready): the shards' health, and the
        scheduler's own verdict (a stalled step) where the backend has one."""
        verdict = getattr(self.backend, "readiness", None)
        reason = verdict() if verdict is not None else None
        if reason is None and not await self.health():
            reason = (verdict() if verdict is not None else None) or "shard_unreachable"
        return reason

    async def tokenize(self, req: GenerateRequest) -> list[schemas.SimpleToken]:
        try:
            tokens = await self.tokenizer.tokenize_async(req.inputs, True)
        except Exception as exc:
            raise ValidationError(f"tokenizer error {exc}") from exc
        truncate = req.parameters.truncate
        if truncate:
            tokens = tokens[-truncate:]
        return [schemas.SimpleToken(**t) for t in tokens]

    @asynccontextmanager
    async def _scheduled(
        self, request: ValidRequest, track: RequestTracker | None = None
    ) -> AsyncIterator[AsyncIterator[InferEvent]]:
        """The backend's event stream, closed on every exit so that the request is cancelled."""
        events = self.backend.schedule(request)
        try:
            with track.scheduled(request) if track is not None else nullcontext():
                yield events
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                # Shielded: the close must reach the backend even while we are being cancelled.
                with anyio.CancelScope(shield=True):
                    try:
                        await aclose()
                    except Exception:
                        logger.exception("closing the backend stream failed")

    async def _collect(
        self, request: ValidRequest, track: RequestTracker | None = None
    ) -> Generation:
        prefill: list[Token] = []
        tokens: list[Token] = []
        top_tokens: list[list[Token]] = []
        async with self._scheduled(request, track) as events:
            async for event in events:
                if isinstance(event, PrefillEvent):
                    prefill = list(event.tokens)
                    continue
                if track is not None:
                    track.token(request)
                tokens.append(event.token)
                top_tokens.append(list(event.top_tokens))
                if isinstance(event, EndEvent):
                    return Generation(
                        request,
                        prefill,
                        tokens,
                        top_tokens,
                        event.generated_text,
                        event.queued_at,
                        event.started_at,
                    )
        raise IncompleteGenerationError()

    async def _collect_all(
        self, requests: Sequence[ValidRequest], track: RequestTracker | None = None
    ) -> list[Generation]:
        """Run sibling requests concurrently; the first failure cancels the others."""
        tasks = [asyncio.ensure_future(self._collect(r, track)) for r in requests]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def generate(
        self, req: GenerateRequest, *, add_special_tokens: bool = True,
        terms: RequestTerms = NO_TERMS,
    ) -> GenerateOutput:
        """Collect a whole generation (best_of siblings concurrently); chat passes False."""
        with self.telemetry.track(req.inputs, stream=False) as track:
            return await self._generate(req, add_special_tokens, terms, track)

    async def _generate(
        self, req: GenerateRequest, add_special_tokens: bool, terms: RequestTerms,
        track: RequestTracker,
    ) -> GenerateOutput:
        start = time.monotonic()
        with self.limiter.permit():
            request = terms.apply(await self.validate(req, add_special_tokens=add_special_tokens))
            track.validated(request)
            best_of = req.parameters.best_of or 1
            # TGI takes one permit per sibling: best_of costs as much as best_of requests.
            with self.limiter.permit(best_of - 1):
                if best_of == 1:
                    generations = [await self._collect(request, track)]
                else:
                    generations = await self._collect_all(
                        [reseeded(request) for _ in range(best_of)], track
                    )
        end = time.monotonic()
        best = max(generations, key=lambda g: g.mean_logprob)
        track.ended(best.generated, best.queued_at, best.started_at)
        others = [g for g in generations if g is not best]
        response = self._response(req, best, others)
        # The backend's stamps are clamped into [start, end] so headers can never go negative.
        queued = min(max(best.queued_at, start), end)
        timings = Timings(start, queued, min(max(best.started_at, queued), end), end)
        return GenerateOutput(
            response, timings, request.input_length, best.generated.generated_tokens
        )

    def _full_text(self, req: GenerateRequest, text: str) -> str:
        return req.inputs + text if req.parameters.return_full_text else text

    def _response(
        self, req: GenerateRequest, best: Generation, others: list[Generation]
    ) -> schemas.GenerateResponse:
        params = req.parameters
        text = self._full_text(req, best.generated.text)
        if not (params.details or params.decoder_input_details):
            return schemas.GenerateResponse(generated_text=text)
        want_top = best.request.top_n_tokens > 0
        sequences = [
            schemas.BestOfSequence(
                generated_text=self._full_text(req, g.generated.text),
                finish_reason=g.generated.finish_reason,
                generated_tokens=g.generated.generated_tokens,
                seed=_seed(g.request),
                prefill=[_api_prefill(t) for t in g.prefill]
                if params.decoder_input_details
                else [],
                tokens=[_api_token(t) for t in g.tokens],
                top_tokens=_api_top_tokens(g) if want_top else None,
            )
            for g in others
        ]
        details = schemas.Details(
            finish_reason=best.generated.finish_reason,
            generated_tokens=best.generated.generated_tokens,
            seed=_seed(best.request),
            prefill=[_api_prefill(t) for t in best.prefill] if params.decoder_input_details else [],
            tokens=[_api_token(t) for t in best.tokens],
            top_tokens=_api_top_tokens(best) if want_top else None,
            best_of_sequences=sequences or None,
        )
        return schemas.GenerateResponse(generated_text=text, details=details)

    async def generate_stream(
        self, req: GenerateRequest, *, add_special_tokens: bool = True,
        terms: RequestTerms = NO_TERMS,
    ) -> AsyncIterator[schemas.StreamResponse]:
        """Stream responses, index from 1; the permit is held until the stream is closed."""
        with self.telemetry.track(req.inputs, stream=True) as track, self.limiter.permit():
            request = terms.apply(
                await self.validate(req, stream=True, add_special_tokens=add_special_tokens)
            )
            track.validated(request)
            index = 0
            async with self._scheduled(request, track) as events:
                async for event in events:
                    if isinstance(event, PrefillEvent):
                        continue
                    index += 1
                    track.token(request)
                    if isinstance(event, EndEvent):
                        track.ended(event.generated_text, event.queued_at, event.started_at)
                    yield self._stream_response(req, request, index, event)
                    if isinstance(event, EndEvent):
                        return
            raise IncompleteGenerationStreamError()

    def _stream_response(
        self,
        req: GenerateRequest,
        request: ValidRequest,
        index: int,
        event: TokenEvent | EndEvent,
    ) -> schemas.StreamResponse:
        response = schemas.StreamResponse(
            index=index,
            token=_api_token(event.token),
            top_tokens=[_api_token(t) for t in event.top_tokens] or None,
        )
        if isinstance(event, EndEvent):
            response.generated_text = self._full_text(req, event.generated_text.text)
            if req.parameters.details:
                response.details = schemas.StreamDetails(
                    finish_reason=event.generated_text.finish_reason,
                    generated_tokens=event.generated_text.generated_tokens,
                    seed=_seed(request),
                    input_length=request.input_length,
                )
        return response
