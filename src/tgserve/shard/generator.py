"""The shard's engine: holds the model, the KV cache and the live batches; runs the steps."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from tgserve.memory import release_free_memory
from tgserve.shard.batch import Batch, RequestState
from tgserve.shard.detokenize import IncrementalDetokenizer
from tgserve.shard.generation import GeneratedText, Generation, StepTimings, Tokens
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.models.base import CausalLM
from tgserve.shard.runner import ForwardInputs, prepare_decode, prepare_forward
from tgserve.shard.sampling.chooser import NextTokenChooser
from tgserve.shard.sampling.logprobs import batch_top_tokens, prompt_logprobs, prompt_top_tokens
from tgserve.shard.sampling.params import SamplingParams, StoppingParams, Watermark
from tgserve.shard.sampling.stopping import StoppingCriteria

log = logging.getLogger(__name__)

# A prompt's tokens with their logprobs, and per position its top-n alternatives.
PromptTokens = tuple[Tokens, list[Tokens]]


@dataclass(frozen=True)
class NewRequest:
    """A request as the router sends it (decoded from the gRPC message by the service)."""

    id: int
    input_ids: list[int]
    slots: list[int]
    params: SamplingParams
    stopping: StoppingParams
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    cache_len: int = 0


class ShardError(RuntimeError):
    """A request the shard cannot run; reported to the router, the shard keeps serving."""


StepResult = tuple[list[Generation], Batch | None, StepTimings]


@dataclass
class AheadStep:
    """A batch's next decode step, computed before the router asked for it (decode_ahead).

    `batch` is the batch as the router still knows it, the step's input. The step's own state
    changes (tokens appended, stopping and sampler state advanced) are exactly those the router's
    next Decode or mixed Prefill of this batch would have made, so that call just returns it.
    """

    batch: Batch
    result: StepResult | None = None
    error: Exception | None = None

    def take(self) -> StepResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Generator:
    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        eos_token_ids: frozenset[int],
        block_size: int = 16,
        release_finished_kv: bool = False,
        kv_dtype: torch.dtype | None = None,
        watermark: Watermark = Watermark(),
    ) -> None:
        self.model = model
        self.watermark = watermark
        self.kv_dtype = kv_dtype or model.dtype
        # Without a prefix cache nothing reads a finished request's blocks again: their pages can
        # go back to the OS at once (the router hands the blocks out again only after it has seen
        # the request finish, and writing them faults in fresh zero pages).
        self.release_finished_kv = release_finished_kv
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.block_size = block_size
        self.device = model.device
        self.kv_cache: KVCache | None = None
        self.batches: dict[int, Batch] = {}
        self.ahead: dict[int, AheadStep] = {}
        self.special_ids = frozenset(tokenizer.all_special_ids)

    # -- KV cache ---------------------------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int) -> None:
        d = self.model.dims
        self.kv_cache = None  # free the old cache before allocating the new one
        self.kv_cache = KVCache.allocate(
            d.num_layers, num_blocks, self.block_size, d.num_kv_heads, d.head_dim,
            self.kv_dtype, self.device,
        )

    def kv_bytes_per_token(self) -> int:
        d = self.model.dims
        return KVCache.bytes_per_token(d.num_layers, d.num_kv_heads, d.head_dim, self.kv_dtype)

    # -- batch cache ------------------------------------------------------------------------

    def clear(self, batch_id: int | None = None) -> None:
        if batch_id is None:
            self.batches.clear()
            self.ahead.clear()
        else:
            self.batches.pop(batch_id, None)
            self.ahead.pop(batch_id, None)

    def view(self, batch_id: int) -> Batch:
        """The batch as the router knows it: before its step computed ahead, if there is one."""
        if batch_id in self.ahead:
            return self.ahead[batch_id].batch
        if batch_id not in self.batches:
            raise ShardError(f"Batch ID {batch_id} not found in cache.")
        return self.batches[batch_id]

    def filter(self, batch_id: int, request_ids: list[int]) -> Batch:
        ahead = self.ahead.get(batch_id)
        if ahead is None:
            batch = self._pop(batch_id).filter(request_ids)
            self.batches[batch.id] = batch
            return batch
        # The step ahead keeps only the rows the router still wants (a client left meanwhile).
        generations, next_batch, timings = ahead.take()
        wanted = set(request_ids)
        if next_batch is not None:
            kept = wanted & set(next_batch.request_ids)
            next_batch = next_batch.filter(request_ids) if kept else None
        ahead.result = ([g for g in generations if g.request_id in wanted], next_batch, timings)
        ahead.batch = ahead.batch.filter(request_ids)
        return ahead.batch

    def _pop(self, batch_id: int) -> Batch:
        if batch_id not in self.batches:
            raise ShardError(f"Batch ID {batch_id} not found in cache.")
        return self.batches.pop(batch_id)

    # -- steps ------------------------------------------------------------------------------

    def prefill(
        self, batch_id: int, new: list[NewRequest], running_id: int | None = None
    ) -> StepResult:
        """Prefill new requests; with `running_id`, that batch's next tokens ride in the same
        forward and the new requests join it (mixed prefill: no decode step waits behind a
        prefill)."""
        if running_id is not None and running_id in self.ahead:
            # Its next tokens are already computed: only the new prompts run.
            ahead = self.ahead.pop(running_id).take()
            return self._merge([ahead, self.prefill(batch_id, new)])
        start = time.perf_counter_ns()
        running = self._pop(running_id) if running_id is not None else None
        requests = [self._request_state(r) for r in new]
        chooser = NextTokenChooser.from_params(
            [r.params for r in requests], [r.all_ids for r in requests],
            self.model.dims.vocab_size, self.device, self.model.kernels,
            watermark_gamma=self.watermark.gamma, watermark_delta=self.watermark.delta,
        )
        joining = Batch(batch_id, requests, chooser, Batch.build_slot_table(requests, self.device))
        inputs = prepare_forward(running, requests, [r.cache_len for r in new], self.device)
        logits, forward_ns = self._forward(inputs)
        assert inputs.sample_rows is not None
        prompt_tokens: list[PromptTokens | None] = [None] * (len(running) if running else 0)
        prompt_tokens += self._prompt_tokens(requests, inputs, logits)
        batch = Batch.concatenate([running, joining]) if running is not None else joining
        return self._step(batch, logits.index_select(0, inputs.sample_rows), prompt_tokens,
                          start, forward_ns)

    def decode(self, batch_ids: list[int]) -> StepResult:
        for i in batch_ids:
            if i not in self.ahead and i not in self.batches:
                raise ShardError(f"Batch ID {i} not found in cache.")
        done = [self.ahead.pop(i).take() for i in batch_ids if i in self.ahead]
        rest = [i for i in batch_ids if i in self.batches]
        if not done:
            return self._decode_now(rest)
        return self._merge(done + ([self._decode_now(rest)] if rest else []))

    def decode_ahead(self, batch_id: int) -> bool:
        """Compute the batch's next decode step now, while the router handles the last one.

        The router's next Decode (or mixed Prefill) of this batch then returns at once. False when
        there is nothing to compute: the batch is gone or its step is already done.
        """
        if batch_id not in self.batches:
            return False
        batch = self.batches.pop(batch_id)
        ahead = AheadStep(batch)
        self.ahead[batch_id] = ahead
        try:
            ahead.result = self._decode_now([batch_id], batch, keep=False)
        except Exception as e:  # noqa: BLE001 - reported to whoever asks for this step
            ahead.error = e
        return True

    def _decode_now(
        self, batch_ids: list[int], batch: Batch | None = None, keep: bool = True
    ) -> StepResult:
        start = time.perf_counter_ns()
        if batch is None:
            batch = Batch.concatenate([self._pop(i) for i in batch_ids])
        concat_ns = time.perf_counter_ns() - start if len(batch_ids) > 1 else None
        logits, forward_ns = self._forward(prepare_decode(batch, self.device))
        generations, next_batch, timings = self._step(batch, logits, None, start, forward_ns, keep)
        timings.concat_ns = concat_ns
        return generations, next_batch, timings

    def _merge(self, results: list[StepResult]) -> StepResult:
        """One step's answer from parts computed apart: the batches left join into one."""
        generations = [g for gens, _, _ in results for g in gens]
        left = [b for _, b, _ in results if b is not None]
        for b in left:
            self.batches.pop(b.id, None)
        batch = Batch.concatenate(left) if left else None
        if batch is not None:
            self.batches[batch.id] = batch
        timings = StepTimings(
            forward_ns=sum(t.forward_ns for *_, t in results),
            decode_ns=sum(t.decode_ns for *_, t in results),
            total_ns=sum(t.total_ns for *_, t in results),
        )
        return generations, batch, timings

    def _forward(self, inputs: ForwardInputs) -> tuple[torch.Tensor, int]:
        if self.kv_cache is None:
            raise ShardError("the KV cache is not allocated: the router must call Warmup first")
        start = time.perf_counter_ns()
        with torch.inference_mode():
            logits = self.model.forward(
                inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, inputs.logit_rows
            )
        return logits, time.perf_counter_ns() - start

    def _request_state(self, r: NewRequest) -> RequestState:
        if not r.input_ids:
            raise ShardError(f"request {r.id} has no input tokens")
        needed = len(r.input_ids) + r.stopping.max_new_tokens - 1
        if len(r.slots) < needed:
            raise ShardError(
                f"request {r.id} has {len(r.slots)} KV slots but needs {needed} "
                f"({len(r.input_ids)} prompt + {r.stopping.max_new_tokens} new - 1)"
            )
        if r.prefill_logprobs and r.cache_len:
            raise ShardError(
                f"request {r.id} asks for prompt logprobs, which need every prompt token computed, "
                f"but {r.cache_len} come from the prefix cache"
            )
        if not 0 <= r.cache_len < len(r.input_ids):
            raise ShardError(
                f"request {r.id} has cache_len {r.cache_len} for {len(r.input_ids)} prompt tokens: "
                "at least the last one must be computed"
            )
        assert self.kv_cache is not None
        if r.slots and max(r.slots) >= self.kv_cache.num_slots:
            raise ShardError(f"request {r.id} names slot {max(r.slots)} beyond the KV cache")
        return RequestState(
            id=r.id,
            all_ids=list(r.input_ids),
            prompt_len=len(r.input_ids),
            slots=list(r.slots),
            params=r.params,
            stopping=StoppingCriteria(self.eos_token_ids, r.stopping),
            detokenizer=IncrementalDetokenizer(self.tokenizer, r.input_ids),
            top_n_tokens=r.top_n_tokens,
            prefill_logprobs=r.prefill_logprobs,
        )

    def _prompt_tokens(
        self, requests: list[RequestState], inputs: ForwardInputs, logits: torch.Tensor
    ) -> list[PromptTokens | None]:
        out: list[PromptTokens | None] = []
        assert inputs.prompt_logit_spans is not None
        for r, span in zip(requests, inputs.prompt_logit_spans):
            if span is None:
                out.append(None)
                continue
            ids = r.all_ids[: r.prompt_len]
            rows = logits[span[0] : span[1] - 1]
            target = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
            lp = prompt_logprobs(rows, target).tolist() if len(ids) > 1 else []
            texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
            tokens = Tokens(ids, [math.nan, *lp], texts, [i in self.special_ids for i in ids])
            tops: list[Tokens] = []
            if r.top_n_tokens and len(ids) > 1:
                # The first prompt token has no prediction: it gets an empty list.
                tops = [Tokens([], [], [], [])] + [
                    self._top_tokens(*top) for top in prompt_top_tokens(rows, r.top_n_tokens)
                ]
            out.append((tokens, tops))
        return out

    def _step(
        self,
        batch: Batch,
        logits: torch.Tensor,
        prompt_tokens: list[PromptTokens | None] | None,
        start_ns: int,
        forward_ns: int,
        keep: bool = True,
    ) -> StepResult:
        """Choose each row's next token, detokenize, check stopping; keep the batch's live rows
        (in `self.batches` unless `keep` is False: a step ahead holds them itself)."""
        decode_start = time.perf_counter_ns()
        out = batch.chooser(logits)
        batch.chooser.advance(out.next_ids)
        next_ids = out.next_ids.tolist()
        logprobs = out.logprobs.tolist()
        tops = (
            batch_top_tokens([r.top_n_tokens for r in batch.requests], out.all_logprobs)
            if any(r.top_n_tokens for r in batch.requests)
            else None
        )
        generations: list[Generation] = []
        live: list[int] = []
        for i, r in enumerate(batch.requests):
            generation = self._advance(r, next_ids[i], logprobs[i])
            prompt = prompt_tokens[i] if prompt_tokens is not None else None
            if prompt is not None:
                generation.prefill_tokens, generation.prefill_top_tokens = prompt
            if tops is not None and r.top_n_tokens:
                generation.top_tokens = [self._top_tokens(*tops[i])]
            generations.append(generation)
            if generation.generated_text is None:
                live.append(r.id)
            elif self.release_finished_kv and self.kv_cache is not None:
                self.kv_cache.release(r.slots)
        next_batch: Batch | None = None
        if live:
            next_batch = batch.filter(live)
            if keep:
                self.batches[next_batch.id] = next_batch
        now = time.perf_counter_ns()
        return generations, next_batch, StepTimings(forward_ns, now - decode_start, now - start_ns)

    def _advance(self, r: RequestState, token: int, logprob: float) -> Generation:
        r.all_ids.append(token)
        text = r.detokenizer.step(token)
        reason = r.stopping(token, text)
        special = token in self.special_ids
        generation = Generation(r.id, Tokens([token], [logprob], [text], [special]))
        if reason is not None:
            final = self.tokenizer.decode(r.generated_ids, skip_special_tokens=True)
            seed = r.params.seed if r.params.sampling else None
            generation.generated_text = GeneratedText(final, len(r.generated_ids), reason, seed)
        return generation

    def _top_tokens(self, ids: list[int], logprobs: list[float]) -> Tokens:
        texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return Tokens(ids, logprobs, texts, [i in self.special_ids for i in ids])


@dataclass(frozen=True)
class WarmupResult:
    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int


def warmup(
    generator: Generator,
    requests: list[NewRequest],
    kv_budget_bytes: int,
    max_position_embeddings: int,
    max_input_tokens: int | None,
    max_total_tokens: int | None,
) -> WarmupResult:
    """Size the KV cache to the budget, prove the largest batch runs, and report what fits."""
    per_block = generator.kv_bytes_per_token() * generator.block_size
    num_blocks = kv_budget_bytes // per_block
    needed_slots = max((max(r.slots) + 1 for r in requests if r.slots), default=0)
    if num_blocks * generator.block_size < needed_slots:
        raise ShardError(
            f"Not enough memory to handle {sum(len(r.input_ids) for r in requests)} prefill "
            f"tokens: the KV cache budget of {kv_budget_bytes} bytes holds "
            f"{num_blocks * generator.block_size} tokens. You need to decrease "
            "--max-batch-prefill-tokens or raise --kv-cache-memory"
        )
    generator.allocate_kv_cache(num_blocks)
    start = time.perf_counter()
    # Prompt log-probabilities would only add a [prefill tokens, vocab] logits tensor here, which
    # proves nothing about the KV capacity and costs seconds on a CPU.
    requests = [replace(r, prefill_logprobs=False) for r in requests]
    if requests:
        log.info("warmup: a prefill of %d tokens in %d request(s) into %d KV blocks...",
                 sum(len(r.input_ids) for r in requests), len(requests), num_blocks)
        _, batch, _ = generator.prefill(2**63 - 1, requests)
        log.info("warmup: prefill done in %.1fs, then one decode step", time.perf_counter() - start)
        if batch is not None:
            generator.decode([batch.id])
    generator.clear()
    assert generator.kv_cache is not None
    generator.kv_cache.forget()  # the warmup's KV pages, resident otherwise
    release_free_memory()  # the warmup batch's activations
    capacity = num_blocks * generator.block_size
    total = max_total_tokens or min(capacity, max_position_embeddings)
    inputs = max_input_tokens or total - 1
    log.info("warmup: %d KV tokens (%s) in %d blocks, in %.2fs", capacity,
             str(generator.kv_dtype).removeprefix("torch."), num_blocks,
             time.perf_counter() - start)
    return WarmupResult(capacity, inputs, total)
