"""The prefix cache on the live default model: `n` choices pay for their prompt once, and a
later request that starts with a computed prompt skips it, with unchanged greedy output."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server import LaunchedServer

BLOCK = 16  # the CPU shard's block size
PROMPT = (
    "Prefix cache check, lighthouse edition. The keeper of the northern lighthouse wrote in "
    "her log every night: the wind, the ships that passed, and the colour of the sea at dusk. "
    "On the last page she wrote"
)


def prompt_tokens(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tgserve_prompt_tokens_total":
                out[sample.labels["source"]] = sample.value
    return out


def complete(url: str, n: int) -> dict:
    body = {"model": "tgserve", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "n": n}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_n_choices_share_the_prompt_kv(default_server: LaunchedServer) -> None:
    url = default_server.url
    before = prompt_tokens(url)
    both = complete(url, 2)
    after = prompt_tokens(url)
    length = both["usage"]["prompt_tokens"]
    reusable = (length - 1) // BLOCK * BLOCK
    assert reusable >= 2 * BLOCK
    # The first choice computed the prompt; the second reused all of it but the last block.
    assert after["cached"] - before["cached"] == reusable
    assert after["computed"] - before["computed"] == 2 * length - reusable
    first, second = (c["text"] for c in both["choices"])
    assert first == second  # greedy: a reused prefix must not change a token

    # A later request with the same prompt skips it too, and still answers the same.
    again = complete(url, 1)
    assert prompt_tokens(url)["cached"] - after["cached"] == reusable
    assert again["choices"][0]["text"] == first
