"""Engine behaviour beyond greedy parity: seeded sampling in batches, stop sequences, warmup."""

from __future__ import annotations

import pytest
import torch

from tests.golden.harness import DEVICE, Harness
from tests.golden.tiny_models import build
from tgserve.shard.generator import ShardError, warmup
from tgserve.shard.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def llama(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("llama")
    build("llama", folder)
    return folder


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (length,), generator=g).tolist()


SEEDED = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=1234)


def test_seeded_request_same_alone_and_in_a_batch_of_8(llama) -> None:  # type: ignore[no-untyped-def]
    alone = Harness(llama)
    alone.add([alone.request(1, prompt(1, 20), 32, params=SEEDED)])
    alone.run_to_end()

    crowd = Harness(llama)
    others = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7),
        SamplingParams(temperature=1.3, seed=99, repetition_penalty=1.2),
        SamplingParams(top_p=0.5, seed=3),
        SamplingParams(typical_p=0.7, seed=4, frequency_penalty=0.5),
        SamplingParams(do_sample=True, seed=1234),  # same seed, other params: other tokens
        SamplingParams(top_k=5, seed=11, watermark=True),
    ]
    # The seeded request joins a running batch of 7, in the middle of the rows.
    crowd.add([crowd.request(10 + i, prompt(10 + i, 15 + i), 40, params=p)
               for i, p in enumerate(others[:4])])
    crowd.step()
    crowd.step()
    crowd.add([crowd.request(20 + i, prompt(20 + i, 12), 40, params=p)
               for i, p in enumerate(others[4:])]
              + [crowd.request(1, prompt(1, 20), 32, params=SEEDED)])
    crowd.run_to_end()
    assert crowd.outputs[1].ids == alone.outputs[1].ids
    assert crowd.outputs[1].logprobs == pytest.approx(alone.outputs[1].logprobs, abs=1e-4)
    assert alone.outputs[1].finish.generated_text.seed == 1234


def test_different_seeds_give_different_samples(llama) -> None:  # type: ignore[no-untyped-def]
    h = Harness(llama)
    h.add([h.request(i, prompt(5, 20), 24, params=SamplingParams(do_sample=True, seed=i))
           for i in range(1, 4)])
    h.run_to_end()
    assert len({tuple(h.outputs[i].ids) for i in range(1, 4)}) == 3


def test_stop_sequence_spanning_tokens(llama) -> None:  # type: ignore[no-untyped-def]
    probe = Harness(llama)
    probe.add([probe.request(1, prompt(8, 10), 20)])
    probe.run_to_end()
    words = "".join(probe.outputs[1].texts)
    # Stop on the text of tokens 5-6 joined: the match only appears once the second one arrives.
    stop = "".join(probe.outputs[1].texts[5:7])
    h = Harness(llama)
    h.add([h.request(1, prompt(8, 10), 20, stop=(stop,))])
    h.run_to_end()
    finish = h.outputs[1].finish
    assert finish is not None and finish.generated_text.finish_reason.name == "STOP_SEQUENCE"
    assert finish.generated_text.text.endswith(stop.strip()) and len(h.outputs[1].ids) <= 7
    assert words.startswith("".join(h.outputs[1].texts))


def test_eos_finishes_the_request(llama) -> None:  # type: ignore[no-untyped-def]
    probe = Harness(llama)
    probe.add([probe.request(1, prompt(9, 10), 10)])
    probe.run_to_end()
    eos = probe.outputs[1].ids[3]
    h = Harness(llama, eos=frozenset({eos}))
    h.add([h.request(1, prompt(9, 10), 10, ignore_eos=False)])
    h.run_to_end()
    assert h.outputs[1].ids == probe.outputs[1].ids[:4]
    assert h.outputs[1].finish.generated_text.finish_reason.name == "EOS_TOKEN"


def test_warmup_capacity_can_really_be_filled(llama) -> None:  # type: ignore[no-untyped-def]
    h = Harness(llama, num_blocks=2)
    budget = h.generator.kv_bytes_per_token() * 16 * 40  # 40 blocks' worth
    result = warmup(h.generator, [], budget, 512, None, None)
    assert result.max_supported_total_tokens == 40 * 16
    assert h.generator.kv_cache.num_slots == 40 * 16
    # Fill every block but the reserved one with requests, as the router may; run them to the end.
    h._free_blocks = list(range(1, 40))
    per_request = (39 * 16) // 3
    reqs = [h.request(i, prompt(30 + i, per_request - 15), 16) for i in range(3)]
    assert sum(len(r.slots) for r in reqs) > 38 * 16
    h.add(reqs)
    h.run_to_end()
    assert all(len(h.outputs[i].ids) == 16 for i in range(3))


def test_warmup_refuses_a_batch_beyond_the_budget(llama) -> None:  # type: ignore[no-untyped-def]
    h = Harness(llama, num_blocks=64)
    big = h.request(1, prompt(1, 200), 300)
    with pytest.raises(ShardError, match="Not enough memory"):
        warmup(h.generator, [big], h.generator.kv_bytes_per_token() * 16 * 8, 512, None, None)


def test_request_without_enough_slots_is_refused(llama) -> None:  # type: ignore[no-untyped-def]
    h = Harness(llama)
    req = h.request(1, prompt(1, 20), 10)
    short = type(req)(**{**req.__dict__, "slots": req.slots[:5]})
    with pytest.raises(ShardError, match="KV slots"):
        h.add([short])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="only a CPU cache (an mmap) hands pages back")
@pytest.mark.parametrize("release", [True, False])
def test_finished_requests_kv_pages_are_released_only_when_asked(llama, release: bool) -> None:  # type: ignore[no-untyped-def]
    """Without a prefix cache the shard gives a finished request's KV pages back (they read as
    zeros); the request still running keeps its KV, and its tokens match a run without release."""
    def run(release_kv: bool) -> tuple[Harness, list[int], list[int]]:
        h = Harness(llama, num_blocks=256)
        h.generator.release_finished_kv = release_kv
        short, long = h.request(1, prompt(1, 70), 3), h.request(2, prompt(2, 70), 40)
        h.add([short, long])
        h.run_to_end()
        return h, short.slots, long.slots

    h, short_slots, _ = run(release)
    reference, _, _ = run(False)
    kv = h.generator.kv_cache
    assert kv is not None
    # Only whole pages go back: the slots on pages the request shares with a neighbour stay.
    zeroed = int(kv.keys[0][torch.tensor(short_slots)].abs().sum(dim=(1, 2)).eq(0).sum())
    assert (zeroed >= 32) if release else (zeroed == 0)
    assert h.outputs[2].ids == reference.outputs[2].ids
    assert h.outputs[1].ids == reference.outputs[1].ids


def _green_share(ids: list[int], first_prev: int, gamma: float, vocab: int) -> float:
    """A detector's view: the share of tokens in the greenlist that their previous token seeds."""
    from tgserve.shard.sampling.functional import greenlist

    prevs = [first_prev, *ids[:-1]]
    hits = [tok in set(greenlist(vocab, prev, gamma).tolist()) for prev, tok in zip(prevs, ids)]
    return sum(hits) / len(hits)


def test_the_server_watermark_reaches_sampling(llama) -> None:  # type: ignore[no-untyped-def]
    """--watermark-gamma/--watermark-delta reach the chooser: the same watermarked request is
    green under the server's gamma, and a detector tuned to 0.25 tells 0.25 from 0.5."""
    from tgserve.shard.sampling.params import Watermark

    ids = prompt(30, 12)
    params = SamplingParams(do_sample=True, seed=5, watermark=True)
    shares = {}
    for gamma in (0.25, 0.5):
        h = Harness(llama, watermark=Watermark(gamma=gamma, delta=12.0))
        h.add([h.request(1, ids, 32, params=params)])
        h.run_to_end()
        vocab = h.generator.model.dims.vocab_size
        shares[gamma] = _green_share(h.outputs[1].ids, ids[-1], 0.25, vocab)
    assert shares[0.25] >= 0.9  # nearly every token green in the 0.25 list
    assert shares[0.5] <= 0.75  # about half: green in the 0.5 list, of which the 0.25 is half
