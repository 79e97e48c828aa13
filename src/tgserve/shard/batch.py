"""Live batch state on the shard: per-request token history and slots; filter and concatenate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tgserve.shard.detokenize import IncrementalDetokenizer
from tgserve.shard.sampling.chooser import NextTokenChooser
from tgserve.shard.sampling.params import SamplingParams
from tgserve.shard.sampling.stopping import StoppingCriteria


@dataclass
class RequestState:
    id: int
    all_ids: list[int]  # prompt + generated; every id but the last has its K/V in the cache
    prompt_len: int
    slots: list[int]  # every KV slot the router allocated to this request, in token order
    params: SamplingParams
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    top_n_tokens: int = 0
    prefill_logprobs: bool = False

    @property
    def generated_ids(self) -> list[int]:
        return self.all_ids[self.prompt_len :]


@dataclass
class Batch:
    id: int
    requests: list[RequestState]
    chooser: NextTokenChooser
    # [B, S] every row's slots, right-padded with 0: a decode step reads its context from here.
    slot_table: torch.Tensor
    _index: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {r.id: i for i, r in enumerate(self.requests)}

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def max_tokens(self) -> int:
        """KV slots this batch holds (the router's accounting unit)."""
        return sum(len(r.slots) for r in self.requests)

    @property
    def current_tokens(self) -> int:
        """Tokens the next forward of this batch computes (one per request when decoding)."""
        return len(self.requests)

    @staticmethod
    def build_slot_table(requests: list[RequestState], device: torch.device) -> torch.Tensor:
        width = max((len(r.slots) for r in requests), default=0)
        table = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            table[i, : len(r.slots)] = torch.tensor(r.slots, dtype=torch.long)
        return table.to(device)

    def filter(self, request_ids: list[int]) -> Batch:
        """Keep only `request_ids` (unknown ids are ignored: they finished on this shard)."""
        keep = [self._index[i] for i in request_ids if i in self._index]
        if keep == list(range(len(self.requests))):
            return self
        requests = [self.requests[i] for i in keep]
        rows = torch.tensor(keep, dtype=torch.long, device=self.slot_table.device)
        table = self.slot_table.index_select(0, rows)
        width = max((len(r.slots) for r in requests), default=0)
        return Batch(self.id, requests, self.chooser.filter(keep), table[:, :width].contiguous())

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        if len(batches) == 1:
            return batches[0]
        requests = [r for b in batches for r in b.requests]
        width = max(b.slot_table.shape[1] for b in batches)
        tables = [torch.nn.functional.pad(b.slot_table, (0, width - b.slot_table.shape[1]))
                  for b in batches]
        chooser = NextTokenChooser.concatenate([b.chooser for b in batches])
        return cls(batches[0].id, requests, chooser, torch.cat(tables, dim=0))
