"""A live server's greedy tokens equal transformers' while requests join and leave its batch.

The whole path runs: launcher, shard (on CUDA where the machine has it: the shard's default
device), router, continuous batching. The reference is transformers on the CPU, float32.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.golden.tiny_models import reference_greedy
from tests.integration.conftest import tiny_server


def words(seed: int, length: int) -> tuple[str, list[int]]:
    """A prompt for the tiny word-level tokenizer (word `wN` is token N), and its ids."""
    ids = torch.randint(1, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return " ".join(f"w{i}" for i in ids), ids


# (prompt seed, prompt length, new tokens): a long request, streamed; once its first token is out
# the others are sent, so they join its running batch (one leaves early, one is short).
LONG = (1, 37, 400)
OTHERS = [(2, 12, 8), (3, 60, 40), (4, 5, 24)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):  # type: ignore[no-untyped-def]
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def test_greedy_tokens_and_logprobs_match_transformers_in_a_moving_batch(
    tiny_model_dir, reference  # type: ignore[no-untyped-def]
) -> None:
    server = tiny_server(tiny_model_dir).start()
    results: dict[int, dict[str, Any]] = {}

    def send(seed: int, length: int, new: int) -> None:
        body = {"inputs": words(seed, length)[0],
                "parameters": {"max_new_tokens": new, "details": True}}
        r = httpx.post(f"{server.url}/generate", json=body, timeout=300)
        results[seed] = {"status": r.status_code, "body": r.json()}

    try:
        threads = [threading.Thread(target=send, args=spec) for spec in OTHERS]
        streamed: list[dict[str, Any]] = []
        body = {"inputs": words(*LONG[:2])[0], "parameters": {"max_new_tokens": LONG[2]}}
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    streamed.append(json.loads(line[5:]))
                    if len(streamed) == 1:
                        for t in threads:
                            t.start()
        for t in threads:
            t.join(timeout=300)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()

    results[LONG[0]] = {"status": 200, "body": {"details": {"tokens": [
        e["token"] for e in streamed]}}}
    for seed, length, new in [LONG, *OTHERS]:
        got = results[seed]
        assert got["status"] == 200, got["body"]
        _, ids = words(seed, length)
        expected, expected_lp = reference_greedy(reference, ids, new)
        tokens = got["body"]["details"]["tokens"]
        assert [t["id"] for t in tokens] == expected, f"request {seed} diverged"
        assert max(abs(t["logprob"] - lp) for t, lp in zip(tokens, expected_lp)) < 1e-4
    # The later requests joined the running batch (continuous batching), not a queue behind it.
    joins = [float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith(("tgi_batch_concat{", "tgi_batch_concat "))]
    assert sum(joins) >= 1
