"""Runs a plan's choices concurrently and folds their deltas into OpenAI chunks or responses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel

from tgserve.router.infer import Infer
from tgserve.router.openai.decode import ChoiceDecoder, Delta, TokenLogprob
from tgserve.router.openai.params import ChoicePlan, Plan, prompt_groups
from tgserve.router.openai.schemas import (
    ChatChoice,
    ChatLogprob,
    ChatLogprobs,
    ChatMessageOut,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)
from tgserve.router.streaming import sse_data
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GeneratedText,
    IncompleteGenerationError,
    InferEvent,
    PrefillEvent,
    ValidRequest,
)

log = logging.getLogger(__name__)

_FINISHED = object()
DONE = b"data: [DONE]\n\n"


@asynccontextmanager
async def _events(
    infer: Infer, request: ValidRequest, track: Any
) -> AsyncIterator[AsyncIterator[InferEvent]]:
    """The backend's events for one choice; closing them (always, shielded) cancels it."""
    events = infer.backend.schedule(request)
    try:
        with track.scheduled(request):
            yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the backend stream failed")


def _carries(delta: Delta) -> bool:
    """Whether a delta has anything to send (a token held back for a stop string has not)."""
    return bool(delta.text or delta.logprobs or delta.finish_reason)


@dataclass
class Run:
    """One API request in flight: its plan, a decoder per choice, the telemetry tracker."""

    infer: Infer
    plan: Plan
    track: Any
    decoders: list[ChoiceDecoder] = field(default_factory=list)
    _ended: bool = False

    def __post_init__(self) -> None:
        self.decoders = [self.plan.decoder() for _ in self.plan.choices]

    @property
    def completion_tokens(self) -> int:
        return sum(d.completion_tokens for d in self.decoders)

    def usage(self) -> Usage:
        completion = self.completion_tokens
        prompt = self.plan.prompt_tokens
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _report_end(self, choice: ChoicePlan, event: EndEvent | None) -> None:
        """Telemetry sees the first choice's end (a stop cut here has no EndEvent of its own)."""
        if self._ended or choice.index != 0:
            return
        self._ended = True
        if event is not None:
            self.track.ended(event.generated_text, event.queued_at, event.started_at)
            return
        decoder = self.decoders[0]
        now = time.monotonic()
        seed = choice.request.parameters.seed if choice.request.parameters.do_sample else None
        generated = GeneratedText(
            decoder.text, decoder.completion_tokens, FinishReason.STOP_SEQUENCE, seed
        )
        self.track.ended(generated, now, now)

    async def _choice_deltas(
        self, choice: ChoicePlan, prefilled: asyncio.Event | None = None
    ) -> AsyncGenerator[Delta, None]:
        """One choice's deltas, from its echo (if asked) to the delta that finishes it."""
        decoder = self.decoders[choice.index]
        pending_echo = choice.echo
        async with _events(self.infer, choice.request, self.track) as events:
            async for event in events:
                if prefilled is not None:
                    prefilled.set()
                if pending_echo is not None:
                    prefill = event if isinstance(event, PrefillEvent) else PrefillEvent([])
                    yield decoder.echo(pending_echo, prefill.tokens, prefill.top_tokens)
                    pending_echo = None
                if isinstance(event, PrefillEvent):
                    continue
                self.track.token(choice.request)
                end = event if isinstance(event, EndEvent) else None
                reason = end.generated_text.finish_reason if end is not None else None
                yield decoder.step(event.token, event.top_tokens, reason)
                if decoder.done:
                    self._report_end(choice, end)
                    return
        raise IncompleteGenerationError()

    async def _run_choice(
        self, choice: ChoicePlan, out: asyncio.Queue[Any], prefilled: asyncio.Event | None
    ) -> None:
        deltas = self._choice_deltas(choice, prefilled)
        try:
            async for delta in deltas:
                out.put_nowait((choice, delta))
        finally:
            await deltas.aclose()

    async def _guarded(
        self,
        choice: ChoicePlan,
        out: asyncio.Queue[Any],
        wait_for: asyncio.Event | None = None,
        prefilled: asyncio.Event | None = None,
    ) -> None:
        try:
            if wait_for is not None:
                await wait_for.wait()
            await self._run_choice(choice, out, prefilled)
            out.put_nowait((choice, _FINISHED))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            out.put_nowait((choice, exc))
        finally:
            if prefilled is not None:
                prefilled.set()  # never leave the siblings waiting, whatever happened

    def _start(self, out: asyncio.Queue[Any]) -> list[asyncio.Future[None]]:
        """One task per choice. With a prefix cache, a prompt's first choice goes alone and its
        siblings follow once its prefill has run, so they reuse its prompt KV instead of each
        computing the prompt again (`n`/`best_of` pay for the prompt once)."""
        if not getattr(self.infer.backend, "prefix_caching", False):
            return [asyncio.ensure_future(self._guarded(c, out)) for c in self.plan.choices]
        tasks: list[asyncio.Future[None]] = []
        for group in prompt_groups(self.plan):
            prefilled = asyncio.Event() if len(group) > 1 else None
            leader, *followers = group
            tasks.append(asyncio.ensure_future(self._guarded(leader, out, None, prefilled)))
            tasks += [asyncio.ensure_future(self._guarded(c, out, prefilled)) for c in followers]
        return tasks

    async def deltas(self) -> AsyncIterator[tuple[ChoicePlan, Delta]]:
        """Every choice's deltas as they happen; the first failure ends (and cancels) them all."""
        if len(self.plan.choices) == 1:
            # One choice (n=1, the common case) runs inline: no task and no queue hop per token,
            # on the cores the shard computes on.
            choice = self.plan.choices[0]
            deltas = self._choice_deltas(choice)
            try:
                async for delta in deltas:
                    if _carries(delta):
                        yield choice, delta
            finally:
                with anyio.CancelScope(shield=True):
                    await deltas.aclose()
            return
        out: asyncio.Queue[Any] = asyncio.Queue()
        tasks = self._start(out)
        remaining = len(tasks)
        try:
            while remaining:
                choice, item = await out.get()
                if item is _FINISHED:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                elif _carries(item):
                    yield choice, item
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)


class SSEChunks:
    """OpenAI's event stream: `data: <chunk>` frames, an error event on failure, then [DONE].

    It owns `stack` (permits, telemetry) and leaves it exactly once: at the end, with the
    failure if there was one, or as a cancellation when the client leaves first, whether or not
    the stream was ever started.
    """

    def __init__(
        self,
        chunks: AsyncIterator[BaseModel],
        stack: ExitStack,
        error_body: Callable[[BaseException], dict[str, Any]],
    ) -> None:
        self.chunks = chunks
        self.stack = stack
        self.error_body = error_body
        self._frames = self._generate()

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        failure: BaseException | None = None
        try:
            async for chunk in self.chunks:
                yield sse_data(chunk)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the stream's error event
            failure = exc
            yield sse_data(self.error_body(exc))
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        yield DONE
        self._leave(failure)

    def _leave(self, failure: BaseException | None) -> None:
        stack, self.stack = self.stack, ExitStack()
        if failure is None:
            stack.close()
        else:
            stack.__exit__(type(failure), failure, failure.__traceback__)

    def __aiter__(self) -> SSEChunks:
        return self

    async def __anext__(self) -> bytes:
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        try:
            await self._frames.aclose()
        finally:
            # A no-op when the stream ended by itself; otherwise the client left early.
            self._leave(asyncio.CancelledError())


# ---------------------------------------------------------------- shaping


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatLogprob(
                token=e.text,
                logprob=e.logprob if e.logprob is not None else float("-inf"),
                bytes=list(e.text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
                    for t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


@dataclass
class CompletionOffsets:
    """Character offsets of each logprob token in its choice's text (prompt tokens from 0)."""

    echo_length: int = 0
    prompt_cursor: int = 0
    cursor: int | None = None

    def shape(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> CompletionLogprobs:
        offsets = []
        for e in entries:
            if e.prompt:
                offsets.append(self.prompt_cursor)
                self.prompt_cursor += len(e.text)
                continue
            if self.cursor is None:
                self.cursor = self.echo_length
            offsets.append(self.cursor)
            self.cursor += len(e.text)
        return CompletionLogprobs(
            tokens=[e.text for e in entries],
            token_logprobs=[e.logprob for e in entries],
            # The first prompt position has no prediction, so no alternatives: null, as OpenAI.
            top_logprobs=[dict(e.top) if e.top or not e.prompt else None for e in entries],
            text_offset=offsets,
        )


@dataclass
class Accumulated:
    """A choice rebuilt from its deltas (the non-streaming answer is these, joined)."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def accumulate(run: Run) -> list[Accumulated]:
    results = [Accumulated() for _ in run.plan.choices]
    async for choice, delta in run.deltas():
        results[choice.index].add(delta)
    return results


def chosen(run: Run, results: list[Accumulated]) -> list[tuple[int, ChoicePlan, Accumulated]]:
    """(output index, choice, result): per prompt, the `n` most likely of its best_of."""
    out = []
    for p, group in enumerate(prompt_groups(run.plan)):
        ranked = sorted(group, key=lambda c: run.decoders[c.index].mean_logprob, reverse=True)
        best = ranked[: run.plan.n] if len(group) > run.plan.n else group
        for rank, choice in enumerate(best):
            out.append((p * run.plan.n + rank, choice, results[choice.index]))
    return out


def chat_choices(run: Run, results: list[Accumulated]) -> list[ChatChoice]:
    return [
        ChatChoice(
            index=index,
            message=ChatMessageOut(content=result.text),
            logprobs=chat_logprobs(result.logprobs) if run.plan.want_logprobs else None,
            finish_reason=result.finish_reason or "stop",
        )
        for index, _, result in chosen(run, results)
    ]
