"""The shard's service computes a small batch's next decode step before the router asks for it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import torch

from tests.golden.harness import Harness
from tests.golden.tiny_models import build
from tgserve.pb import generate_pb2 as pb
from tgserve.shard.generator import NewRequest
from tgserve.shard.service import ShardSettings, TextGenerationService


@pytest.fixture(scope="module")
def llama(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("llama")
    build("llama", folder)
    return folder


class Aborted(Exception):
    pass


class Context:
    """What the servicer uses of grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborts.append((code, details))
        raise Aborted(details)


def pb_request(r: NewRequest) -> pb.Request:
    return pb.Request(
        id=r.id, input_ids=r.input_ids, slots=r.slots, truncate=len(r.input_ids),
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                 repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=r.stopping.max_new_tokens, ignore_eos_token=True),
    )


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (length,), generator=g).tolist()


class Shard:
    """A servicer over a fresh engine, with a count of the forwards it runs."""

    def __init__(self, folder: Any, max_batch: int = 16) -> None:
        self.h = Harness(folder)
        settings = ShardSettings(model_type="llama", dtype="float32", max_position_embeddings=512,
                                 kv_budget_bytes=0, urls=(), decode_ahead_max_batch=max_batch)
        self.service = TextGenerationService(self.h.generator, settings)
        self.forwards = 0
        forward = self.h.generator._forward

        def counted(inputs):  # type: ignore[no-untyped-def]
            self.forwards += 1
            return forward(inputs)

        self.h.generator._forward = counted  # type: ignore[method-assign]
        self.context = Context()

    async def settle(self) -> None:
        """Let a step started ahead run to its end."""
        while self.service._ahead_tasks:
            await asyncio.sleep(0)

    async def prefill(self, batch_id: int, requests: list[NewRequest], ahead: bool,
                      running: pb.CachedBatch | None = None) -> pb.PrefillResponse:
        batch = pb.Batch(id=batch_id, requests=[pb_request(r) for r in requests],
                         size=len(requests))
        request = pb.PrefillRequest(batch=batch, decode_ahead=ahead)
        if running is not None:
            request.cached_batch.CopyFrom(running)
        return await self.service.Prefill(request, self.context)

    async def decode(self, batch: pb.CachedBatch, ahead: bool) -> pb.DecodeResponse:
        return await self.service.Decode(pb.DecodeRequest(batches=[batch], decode_ahead=ahead),
                                         self.context)


def tokens_of(responses: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for response in responses:
        for g in response.generations:
            out.setdefault(g.request_id, []).extend(g.tokens.ids)
    return out


async def run_moving_batch(shard: Shard, ahead: bool) -> tuple[list[Any], list[int]]:
    """A runs; B joins in a mixed prefill at step 3; C is filtered out (cancelled) at step 5.

    Returns the responses and, per Decode, how many forwards ran inside the call itself.
    """
    h = shard.h
    a = h.request(1, prompt(1, 20), 12)
    b, c = h.request(2, prompt(2, 9), 6), h.request(3, prompt(3, 13), 12)
    responses: list[Any] = [await shard.prefill(1, [a], ahead)]
    batch = responses[0].batch
    inside: list[int] = []
    step = 0
    while batch.request_ids:
        step += 1
        await shard.settle()
        before = shard.forwards
        if step == 3:
            response = await shard.prefill(2, [b, c], ahead, running=batch)
        else:
            if step == 5:
                keep = [i for i in batch.request_ids if i != 3]
                filtered = await shard.service.FilterBatch(
                    pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep), shard.context)
                batch = filtered.batch
            response = await shard.decode(batch, ahead)
            inside.append(shard.forwards - before)
        responses.append(response)
        if not response.HasField("batch"):
            break
        batch = response.batch
    await shard.settle()
    return responses, inside


def test_decodes_answered_from_steps_done_ahead_give_the_same_tokens(llama) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        on_demand, inside_plain = await run_moving_batch(Shard(llama), ahead=False)
        shard = Shard(llama)
        ahead, inside_ahead = await run_moving_batch(shard, ahead=True)
        assert tokens_of(ahead) == tokens_of(on_demand)
        assert len(tokens_of(ahead)[1]) == 12 and len(tokens_of(ahead)[2]) == 6
        assert len(tokens_of(ahead)[3]) < 12  # cancelled
        assert all(n == 1 for n in inside_plain)
        # Every Decode found its step done; the filtered one too (its step kept A and B's rows).
        assert all(n == 0 for n in inside_ahead)
        assert shard.h.generator.ahead == {} and shard.h.generator.batches == {}
        assert shard.context.aborts == []

    asyncio.run(main())


def test_no_step_ahead_unless_the_router_asks_and_the_batch_is_small(llama) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        shard = Shard(llama, max_batch=1)
        h = shard.h
        one = await shard.prefill(1, [h.request(1, prompt(1, 8), 4)], ahead=False)
        await shard.settle()
        assert h.generator.ahead == {}
        await shard.decode(one.batch, ahead=True)
        await shard.settle()
        assert list(h.generator.ahead) == [one.batch.id]
        two = await shard.prefill(2, [h.request(2, prompt(2, 8), 4), h.request(3, prompt(3, 8), 4)],
                                  ahead=True)
        await shard.settle()
        assert two.batch.id not in h.generator.ahead  # 2 rows > max_batch=1

    asyncio.run(main())


def test_a_step_ahead_that_fails_fails_the_call_that_asks_for_it(llama) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        shard = Shard(llama)
        h = shard.h
        forward = h.generator._forward
        first = await shard.prefill(1, [h.request(1, prompt(1, 8), 6)], ahead=False)

        def broken(inputs):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

        # Computed in the call; its step ahead starts only once the call has returned.
        second = await shard.decode(first.batch, ahead=True)
        assert [g.request_id for g in second.generations] == [1]
        h.generator._forward = broken  # type: ignore[method-assign]
        await shard.settle()
        assert h.generator.ahead[second.batch.id].error is not None
        with pytest.raises(Aborted, match="device lost"):
            await shard.decode(second.batch, ahead=True)
        assert shard.context.aborts[0][0] == grpc.StatusCode.INTERNAL
        # The router clears the failed batch; the shard serves the next request as before.
        h.generator._forward = forward  # type: ignore[method-assign]
        await shard.service.ClearCache(pb.ClearCacheRequest(id=second.batch.id), shard.context)
        again = await shard.prefill(2, [h.request(2, prompt(2, 8), 2)], ahead=True)
        assert len(again.generations) == 1

    asyncio.run(main())


def test_decode_stream_answers_each_step_in_order(llama) -> None:  # type: ignore[no-untyped-def]
    """DecodeStream gives, step by step, what unary Decode calls give; an error ends it."""

    async def main() -> None:
        plain = Shard(llama)
        responses: list[Any] = [await plain.prefill(1, [plain.h.request(1, prompt(1, 20), 8)],
                                                    ahead=False)]
        while responses[-1].HasField("batch"):
            responses.append(await plain.decode(responses[-1].batch, ahead=False))

        shard = Shard(llama)
        streamed: list[Any] = [await shard.prefill(1, [shard.h.request(1, prompt(1, 20), 8)],
                                                   ahead=True)]
        asked: asyncio.Queue[pb.DecodeRequest | None] = asyncio.Queue()
        asked.put_nowait(pb.DecodeRequest(batches=[streamed[0].batch], decode_ahead=True))

        async def requests():  # type: ignore[no-untyped-def]
            while (request := await asked.get()) is not None:
                yield request

        async for response in shard.service.DecodeStream(requests(), shard.context):
            streamed.append(response)
            asked.put_nowait(
                pb.DecodeRequest(batches=[response.batch], decode_ahead=True)
                if response.HasField("batch") else None
            )
        await shard.settle()
        assert tokens_of(streamed) == tokens_of(responses)
        assert len(tokens_of(streamed)[1]) == 8 and len(streamed) == 8
        assert shard.context.aborts == []

        async def unknown():  # type: ignore[no-untyped-def]
            yield pb.DecodeRequest(batches=[pb.CachedBatch(id=999, request_ids=[1], size=1)])

        with pytest.raises(Aborted):
            async for _ in shard.service.DecodeStream(unknown(), shard.context):
                pass
        assert shard.context.aborts == [
            (grpc.StatusCode.INVALID_ARGUMENT, "Batch ID 999 not found in cache.")]

    asyncio.run(main())
