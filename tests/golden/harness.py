"""Drives the shard engine directly (no gRPC) the way the router does: blocks, joins, leaves."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tgserve.shard.generation import Generation
from tgserve.shard.generator import Generator, NewRequest
from tgserve.shard.kernels import KernelOps
from tgserve.shard.loading.loaders import load_model
from tgserve.shard.sampling.params import SamplingParams, StoppingParams, Watermark

# The engine's device in these tests. The reference (transformers) always runs on the CPU, so
# TGSERVE_TEST_DEVICE=cuda checks the GPU path against the same float32 answers.
DEVICE = torch.device(os.environ.get("TGSERVE_TEST_DEVICE", "cpu"))


@dataclass
class Output:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    prefill: list[float] | None = None
    prefill_top: list[tuple[list[int], list[float]]] | None = None
    finish: Generation | None = None


class Harness:
    def __init__(
        self,
        model_dir: Path,
        num_blocks: int = 128,
        block_size: int = 16,
        gguf_file: Path | None = None,
        eos: frozenset[int] = frozenset(),
        ahead: bool = False,
        kv_dtype: torch.dtype | None = None,
        watermark: Watermark = Watermark(),
        kernels: KernelOps | None = None,
    ) -> None:
        """With `ahead`, every step's batch has its next step computed at once, as a shard does
        for small batches (Generator.decode_ahead): joins, leaves and cancels then meet it.
        `kernels`: the ops the model runs on (by default, what a shard on DEVICE selects)."""
        model = load_model(model_dir, DEVICE, "float32", gguf_file=gguf_file, kernels=kernels)
        self.model_dir, self.gguf_file = model_dir, gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.generator = Generator(model, self.tokenizer, eos, block_size, kv_dtype=kv_dtype,
                                   watermark=watermark)
        self.generator.allocate_kv_cache(num_blocks)
        self.block_size = block_size
        self.ahead = ahead
        self._free_blocks = list(range(1, num_blocks))  # block 0 is the router's health block
        self._ids = itertools.count(1)
        self.batch_ids: list[int] = []
        self.outputs: dict[int, Output] = {}

    def request(
        self,
        rid: int,
        input_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        ignore_eos: bool = True,
        top_n_tokens: int = 0,
        prefill_logprobs: bool = False,
        stop: tuple[str, ...] = (),
        prefix_of: NewRequest | None = None,
        cache_len: int = 0,
    ) -> NewRequest:
        """With `prefix_of`, the first `cache_len` tokens (whole blocks) reuse that request's KV
        blocks, as the router's prefix cache hands them out."""
        assert cache_len % self.block_size == 0 and (cache_len == 0 or prefix_of is not None)
        shared = list(prefix_of.slots[:cache_len]) if prefix_of is not None else []
        tokens = len(input_ids) + max_new_tokens - 1
        n_blocks = -(-(tokens - cache_len) // self.block_size)
        blocks, self._free_blocks = self._free_blocks[:n_blocks], self._free_blocks[n_blocks:]
        own = [b * self.block_size + i for b in blocks for i in range(self.block_size)]
        slots = (shared + own)[:tokens]
        return NewRequest(
            id=rid, input_ids=list(input_ids), slots=slots, params=params or SamplingParams(),
            stopping=StoppingParams(max_new_tokens, stop, ignore_eos),
            top_n_tokens=top_n_tokens, prefill_logprobs=prefill_logprobs, cache_len=cache_len,
        )

    def _record(self, generations: list[Generation]) -> None:
        for g in generations:
            out = self.outputs.setdefault(g.request_id, Output())
            if g.prefill_tokens is not None:
                out.prefill = g.prefill_tokens.logprobs
                out.prefill_top = [(t.ids, t.logprobs) for t in g.prefill_top_tokens]
            out.ids.extend(g.tokens.ids)
            out.logprobs.extend(g.tokens.logprobs)
            out.texts.extend(g.tokens.texts)
            if g.generated_text is not None:
                out.finish = g

    def add(self, requests: list[NewRequest], mixed: bool = False) -> None:
        """Prefill `requests`; `mixed` joins them to the running batch in the same forward."""
        running = self.batch_ids[0] if mixed and self.batch_ids else None
        generations, batch, _ = self.generator.prefill(next(self._ids), requests, running)
        self._record(generations)
        if running is not None:
            self.batch_ids = []
        if batch is not None:
            self.batch_ids.append(batch.id)
            self._decode_ahead(batch.id)

    def step(self) -> None:
        if not self.batch_ids:
            return
        generations, batch, _ = self.generator.decode(self.batch_ids)
        self._record(generations)
        self.batch_ids = [batch.id] if batch is not None else []
        if batch is not None:
            self._decode_ahead(batch.id)

    def _decode_ahead(self, batch_id: int) -> None:
        if self.ahead:
            assert self.generator.decode_ahead(batch_id)
            assert batch_id in self.generator.ahead

    def cancel(self, rid: int) -> None:
        """What the router does when a client leaves: filter the request out of the batch."""
        (bid,) = self.batch_ids
        keep = [i for i in self.generator.view(bid).request_ids if i != rid]
        if keep:
            self.generator.filter(bid, keep)
        else:
            self.generator.clear(bid)
            self.batch_ids = []

    def run_to_end(self) -> None:
        while self.batch_ids:
            self.step()

    @property
    def running(self) -> list[int]:
        return [r for b in self.batch_ids for r in self.generator.view(b).request_ids]


def count_calls(monkeypatch, owner: object, name: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Wraps owner.<name> for the test; the returned one-item list counts the calls."""
    calls = [0]
    real = getattr(owner, name)

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls
