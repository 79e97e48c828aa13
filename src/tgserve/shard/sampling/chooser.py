"""Batched next-token choice: per-row processors, warpers, greedy or seeded sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tgserve.shard.kernels import KernelOps
from tgserve.shard.sampling import functional as F
from tgserve.shard.sampling.params import SamplingParams

Needs = Callable[[SamplingParams], bool]

# Per-row state tensors, each kept only while some row needs it. Rows that do not need a tensor
# hold zeros there, which is why concatenating with a chooser that lacks it can pad with zeros.
_STATE_NEEDS: dict[str, Needs] = {
    # occurrences in prompt + generated tokens: repetition and frequency penalties, as TGI
    "seen_counts": lambda p: p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0,
    # occurrences in generated tokens only: presence penalty, as OpenAI (a chat prompt holds the
    # end-of-turn token, which a prompt-wide presence penalty would push the model away from)
    "generated_counts": lambda p: p.presence_penalty != 0.0 or p.additive_frequency_penalty != 0.0,
    "seq_lens": lambda p: p.frequency_penalty != 0.0,  # prompt + generated length
    "last_ids": lambda p: p.watermark,  # previous token, seeds the greenlist
}

# Row-wise ops in TGI's order (§5.4): watermark, penalties, logit bias, then the warpers.
# (kind, row needs it, its parameter, dtype of the parameter tensor)
_OPS: tuple[tuple[str, Needs, Callable[[SamplingParams], float], torch.dtype], ...] = (
    ("watermark", lambda p: p.watermark, lambda p: 1.0, torch.float32),
    ("repetition", lambda p: p.repetition_penalty != 1.0, lambda p: p.repetition_penalty,
     torch.float32),
    ("frequency", lambda p: p.frequency_penalty != 0.0, lambda p: p.frequency_penalty,
     torch.float32),
    ("additive_frequency", lambda p: p.additive_frequency_penalty != 0.0,
     lambda p: p.additive_frequency_penalty, torch.float32),
    ("presence", lambda p: p.presence_penalty != 0.0, lambda p: p.presence_penalty, torch.float32),
    ("logit_bias", lambda p: bool(p.logit_bias), lambda p: 0.0, torch.float32),
    ("temperature", lambda p: p.temperature != 1.0, lambda p: p.temperature, torch.float32),
    ("top_k", lambda p: p.top_k > 0, lambda p: p.top_k, torch.int64),
    ("top_p", lambda p: p.top_p < 1.0, lambda p: p.top_p, torch.float32),
    ("typical_p", lambda p: p.typical_p < 1.0, lambda p: p.typical_p, torch.float32),
)


@dataclass
class ChooserOutput:
    next_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, chosen token in the final (post-warp) distribution
    scores: torch.Tensor  # [B, V] the final (post-warp) scores
    _all_logprobs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def all_logprobs(self) -> torch.Tensor:
        """[B, V] float32 log_softmax of the final scores, made on first use: a greedy step needs
        only the chosen tokens' log-probabilities, and this is the step's largest tensor."""
        if self._all_logprobs is None:
            self._all_logprobs = torch.log_softmax(self.scores, dim=-1, dtype=torch.float32)
        return self._all_logprobs


@dataclass(frozen=True)
class _RowOp:
    kind: str
    rows: torch.Tensor | None  # [R] rows taking part; None when every row does
    values: torch.Tensor  # [R] the per-row parameter
    max_value: int = 0  # largest top_k, known on the host to spare a device sync
    extra: tuple[torch.Tensor, ...] = ()  # logit_bias: (rows in op coordinates, token ids, bias)


def _index_or_none(rows: list[int], batch_size: int, device: torch.device) -> torch.Tensor | None:
    if len(rows) == batch_size:
        return None
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _bias_triples(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Flat (row, token, bias) over the given rows; out-of-vocabulary ids are ignored."""
    triples = [
        (row, tok, bias)
        for row, p in enumerate(params)
        for tok, bias in p.logit_bias.items()
        if 0 <= tok < vocab_size
    ]
    rows, toks, biases = zip(*triples) if triples else ((), (), ())
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(toks, dtype=torch.int64, device=device),
        torch.tensor(biases, dtype=torch.float32, device=device),
    )


def _build_ops(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[_RowOp, ...]:
    ops: list[_RowOp] = []
    for kind, needs, value, dtype in _OPS:
        rows = [i for i, p in enumerate(params) if needs(p)]
        if not rows:
            continue
        vals = [value(params[i]) for i in rows]
        ops.append(
            _RowOp(
                kind=kind,
                rows=_index_or_none(rows, len(params), device),
                values=torch.tensor(vals, dtype=dtype, device=device),
                max_value=int(max(vals)) if kind == "top_k" else 0,
                extra=(
                    _bias_triples([params[i] for i in rows], vocab_size, device)
                    if kind == "logit_bias"
                    else ()
                ),
            )
        )
    return tuple(ops)


def _fork(gen: torch.Generator) -> torch.Generator:
    twin = torch.Generator(device=gen.device)
    twin.set_state(gen.get_state())
    return twin


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass(eq=False)
class NextTokenChooser:
    """Sampling state of one batch. Verbs: from_params, __call__, advance, filter, concatenate."""

    params: tuple[SamplingParams, ...]
    vocab_size: int
    device: torch.device
    state: dict[str, torch.Tensor]  # see _STATE_NEEDS; rows first
    generators: list[torch.Generator | None]  # per row; None for greedy rows
    kernels: KernelOps  # the model's: its greedy choice
    watermark_gamma: float = F.WATERMARK_GAMMA
    watermark_delta: float = F.WATERMARK_DELTA
    _ops: tuple[_RowOp, ...] = field(init=False, repr=False)
    _sample_rows: list[int] = field(init=False, repr=False)
    _sample_index: torch.Tensor | None = field(init=False, repr=False)
    # Generators advanced by the last __call__, committed by advance(): __call__ stays repeatable.
    _pending: list[torch.Generator] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ops = _build_ops(self.params, self.vocab_size, self.device)
        self._sample_rows = [i for i, p in enumerate(self.params) if p.sampling]
        self._sample_index = _index_or_none(self._sample_rows, len(self.params), self.device)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        kernels: KernelOps,
        watermark_gamma: float = F.WATERMARK_GAMMA,
        watermark_delta: float = F.WATERMARK_DELTA,
    ) -> NextTokenChooser:
        device = torch.device(device)
        params = tuple(params)
        state = {
            name: _initial_state(name, params, prompt_ids, vocab_size, device)
            for name, needs in _STATE_NEEDS.items()
            if any(needs(p) for p in params)
        }
        generators = [_seeded(p.seed, device) if p.sampling else None for p in params]
        return cls(
            params, vocab_size, device, state, generators, kernels, watermark_gamma,
            watermark_delta,
        )  # fmt: skip

    def __call__(self, logits: torch.Tensor) -> ChooserOutput:
        """Choose one token per row of logits [B, V]; the chooser's state is left as it was."""
        if logits.dim() != 2 or logits.shape != (len(self.params), self.vocab_size):
            raise ValueError(
                f"logits {tuple(logits.shape)} != ({len(self.params)}, {self.vocab_size})"
            )
        scores = logits
        if self._ops:
            scores = logits.to(torch.float32, copy=True)  # ours to edit in place from here on
            for op in self._ops:
                scores = self._run(op, scores)
        if not self._sample_rows:
            next_ids, logprobs, all_logprobs = self.kernels.greedy(scores)
            return ChooserOutput(next_ids, logprobs, scores, all_logprobs)
        all_logprobs = torch.log_softmax(scores, dim=-1, dtype=torch.float32)
        next_ids = scores.argmax(dim=-1)
        if self._sample_rows:
            sampled = self._sample(all_logprobs)
            if self._sample_index is None:
                next_ids = sampled
            else:
                next_ids = next_ids.index_copy(0, self._sample_index, sampled)
        logprobs = all_logprobs.gather(1, next_ids.unsqueeze(-1)).squeeze(-1)
        return ChooserOutput(next_ids, logprobs, scores, all_logprobs)

    def advance(self, next_ids: torch.Tensor) -> None:
        """Record the tokens chosen for every row ([B] ids) and commit the sampling draws."""
        ids = next_ids.to(self.device, torch.int64).reshape(-1, 1)  # [B, 1]
        for name in ("seen_counts", "generated_counts"):
            counts = self.state.get(name)
            if counts is not None:
                counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
        if "seq_lens" in self.state:
            self.state["seq_lens"] += 1
        if "last_ids" in self.state:
            self.state["last_ids"] = ids.squeeze(-1).clone()
        if self._pending is not None:
            for row, gen in zip(self._sample_rows, self._pending):
                self.generators[row] = gen
            self._pending = None

    def filter(self, indices: Sequence[int]) -> NextTokenChooser:
        """Keep the given rows, in that order."""
        keep = list(indices)
        params = tuple(self.params[i] for i in keep)
        index = torch.tensor(keep, dtype=torch.int64, device=self.device)
        state = {
            name: tensor.index_select(0, index)
            for name, tensor in self.state.items()
            if any(_STATE_NEEDS[name](p) for p in params)
        }
        generators = [self.generators[i] for i in keep]
        return NextTokenChooser(
            params, self.vocab_size, self.device, state, generators, self.kernels,
            self.watermark_gamma, self.watermark_delta,
        )

    @classmethod
    def concatenate(cls, choosers: Sequence[NextTokenChooser]) -> NextTokenChooser:
        """Each chooser's rows in turn; missing state is zero-filled (its rows never read it)."""
        first = choosers[0]
        if any(c.vocab_size != first.vocab_size or c.device != first.device for c in choosers):
            raise ValueError("cannot concatenate choosers with different vocab sizes or devices")
        params = tuple(p for c in choosers for p in c.params)
        state: dict[str, torch.Tensor] = {}
        for name, needs in _STATE_NEEDS.items():
            if any(needs(p) for p in params):
                state[name] = torch.cat([_state_or_zeros(c, name) for c in choosers], dim=0)
        generators = [g for c in choosers for g in c.generators]
        return cls(
            params, first.vocab_size, first.device, state, generators, first.kernels,
            first.watermark_gamma, first.watermark_delta,
        )

    def _run(self, op: _RowOp, scores: torch.Tensor) -> torch.Tensor:
        """Apply one op to its rows only; other rows are not touched at all."""
        if op.rows is None:
            return self._kernel(op, scores, None)
        sub = scores.index_select(0, op.rows)
        return scores.index_copy_(0, op.rows, self._kernel(op, sub, op.rows))

    def _rows_of(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        tensor = self.state[name]
        return tensor if rows is None else tensor.index_select(0, rows)

    def _kernel(self, op: _RowOp, sub: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        match op.kind:
            case "watermark":
                prev = self._rows_of("last_ids", rows).tolist()
                return F.watermark(
                    sub, prev, [True] * len(prev), self.watermark_gamma, self.watermark_delta
                )
            case "repetition":
                return F.repetition_penalty(sub, self._rows_of("seen_counts", rows), op.values)
            case "frequency":
                counts = self._rows_of("seen_counts", rows)
                return F.frequency_penalty(sub, counts, self._rows_of("seq_lens", rows), op.values)
            case "additive_frequency":
                counts = self._rows_of("generated_counts", rows)
                return F.additive_frequency_penalty(sub, counts, op.values)
            case "presence":
                counts = self._rows_of("generated_counts", rows)
                return F.presence_penalty(sub, counts, op.values)
            case "logit_bias":
                return F.logit_bias(sub, *op.extra)
            case "temperature":
                return F.temperature(sub, op.values)
            case "top_k":
                return F.top_k(sub, op.values, op.max_value)
            case "top_p":
                return F.top_p(sub, op.values)
            case "typical_p":
                return F.typical_p(sub, op.values)
        raise AssertionError(f"unknown op {op.kind}")

    def _sample(self, all_logprobs: torch.Tensor) -> torch.Tensor:
        """Exponential race argmax(p / Exp(1)) with each row's own generator: [S] ids."""
        rows = self._sample_index
        probs = (all_logprobs if rows is None else all_logprobs.index_select(0, rows)).exp()
        noise = torch.empty_like(probs)  # [S, V]
        pending: list[torch.Generator] = []
        for j, row in enumerate(self._sample_rows):
            gen = self.generators[row]
            assert gen is not None, "sampling row without a generator"
            draw = _fork(gen)
            noise[j].uniform_(generator=draw)
            pending.append(draw)
        self._pending = pending
        # Exp(1) as -log(U), batched: several times faster on CPU than exponential_ per row.
        noise.log_().neg_()
        # A zero draw would make 0/0 = NaN on a masked token, and argmax picks NaN first.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)


def _initial_state(
    name: str,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    batch = len(params)
    if name == "seen_counts":
        needs = _STATE_NEEDS[name]
        rows = [r for r, p in enumerate(params) if needs(p) for _ in prompt_ids[r]]
        toks = [t for r, p in enumerate(params) if needs(p) for t in prompt_ids[r]]
        counts = torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
        index = (
            torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(toks, dtype=torch.int64, device=device),
        )
        return counts.index_put_(index, torch.ones(len(toks), device=device), accumulate=True)
    if name == "generated_counts":
        return torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
    if name == "seq_lens":
        return torch.tensor([len(ids) for ids in prompt_ids], dtype=torch.float32, device=device)
    if name == "last_ids":
        last = [ids[-1] if len(ids) else 0 for ids in prompt_ids]
        return torch.tensor(last, dtype=torch.int64, device=device)
    raise AssertionError(f"unknown state {name}")


def _state_or_zeros(chooser: NextTokenChooser, name: str) -> torch.Tensor:
    tensor = chooser.state.get(name)
    if tensor is not None:
        return tensor
    batch = len(chooser.params)
    device = chooser.device
    if name in ("seen_counts", "generated_counts"):
        return torch.zeros(batch, chooser.vocab_size, dtype=torch.float32, device=device)
    if name == "seq_lens":
        return torch.zeros(batch, dtype=torch.float32, device=device)
    return torch.zeros(batch, dtype=torch.int64, device=device)
