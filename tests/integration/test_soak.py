"""Soak on the live default model: a few hundred mixed requests at high concurrency, with clients
leaving mid-stream and before their first token. Every completed answer must equal the same
request served alone, and the server must come back to idle: no queued or batched request, no KV
block held, and the shard's resident memory near where it started."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server import LaunchedServer

pytestmark = pytest.mark.longrun

# Tight enough that the batch cap, the KV budget and the per-step prefill budget all bind under
# this load, so requests queue, join running batches and wait for blocks; roomy enough to start
# quickly on two cores.
LIMITS = ["--max-batch-prefill-tokens", "512", "--max-input-tokens", "400",
          "--max-total-tokens", "512", "--kv-cache-memory", "64MiB", "--max-batch-size", "12",
          "--max-step-prefill-tokens", "128", "--max-concurrent-requests", "128"]
CLIENTS = 48
STORM = 300
CANCEL_SHARE = 0.08  # of all storm requests: the client closes the socket right after sending
LEAVE_SHARE = 0.2  # of streamed storm requests: the client closes after a few events
# The shard's resident memory after the storm may exceed the baseline (taken after warm-up, the
# reference pass and one full concurrent round) by this much. Growth past it on a few hundred
# requests would be a per-request leak, which a long-running server cannot afford; below it is
# allocator noise (glibc arenas, torch's caching of step buffers of new shapes).
RSS_MARGIN_MIB = 32

# Shared openings: long enough (several 16-token blocks) that later prompts reuse them from the
# prefix cache while their own endings are computed.
PREAMBLE = (
    "Harbour log, winter season. The keeper of the northern lighthouse wrote every night about "
    "the wind, the ships that passed, the colour of the sea at dusk and the birds on the rocks. "
)
SYSTEM = (
    "You are the assistant of a small harbour museum. Answer visitors briefly and kindly, in "
    "plain words, and never invent dates, names or numbers that you were not given."
)
ENDINGS = [
    "On the last page she wrote", "The oldest ship in the harbour was", "That night the storm",
    "Her favourite bird was", "The lamp was lit at", "A fisherman came to ask",
]
QUESTIONS = [
    "What is a lighthouse for?", "Why are some boats painted red?", "Name three sea birds.",
    "How do tides work?", "What should I see first?",
]
KINDS = ("generate", "generate_stream", "chat", "chat_stream", "completions",
         "completions_stream")


@dataclass(frozen=True)
class Spec:
    """One distinct request; the storm sends each many times."""

    kind: str
    text: str
    max_new_tokens: int
    seed: int | None  # None: greedy

    @property
    def stream(self) -> bool:
        return self.kind.endswith("_stream")

    @property
    def path(self) -> str:
        return {"generate": "/generate", "generate_stream": "/generate_stream",
                "chat": "/v1/chat/completions", "chat_stream": "/v1/chat/completions",
                "completions": "/v1/completions",
                "completions_stream": "/v1/completions"}[self.kind]

    def body(self) -> dict:
        if self.kind.startswith("generate"):
            sampling = {} if self.seed is None else {
                "do_sample": True, "seed": self.seed, "temperature": 0.9, "top_p": 0.95}
            return {"inputs": self.text, "parameters": {
                "max_new_tokens": self.max_new_tokens, "details": True, **sampling}}
        sampling = {"temperature": 0} if self.seed is None else {
            "temperature": 0.8, "top_p": 0.9, "seed": self.seed}
        body: dict = {"model": "tgserve", "max_tokens": self.max_new_tokens,
                      "stream": self.stream, **sampling}
        if self.kind.startswith("chat"):
            body["messages"] = [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text
        return body


@dataclass(frozen=True)
class Answer:
    """What a request produced: token ids where the API gives them (TGI's), else text only."""

    text: str
    ids: tuple[int, ...] | None
    finish: str | None


def specs() -> list[Spec]:
    rng = random.Random(30)
    out = []
    for kind in KINDS:
        chat = kind.startswith("chat")
        pool = QUESTIONS if chat else [PREAMBLE + e for e in ENDINGS]
        # One short prompt per kind shares nothing with the others.
        pool = [*pool, "Hi!" if chat else "Once upon a time"]
        for i, text in enumerate(pool[:7]):
            seed = None if i % 3 == 0 else rng.randrange(1 << 32)
            out.append(Spec(kind, text, rng.randint(4, 24), seed))
    return out


# ---- one client ---------------------------------------------------------------------------


def parse_events(spec: Spec, events: list[dict]) -> Answer:
    if spec.kind == "generate_stream":
        last = events[-1]
        ids = tuple(e["token"]["id"] for e in events)
        finish = last["details"]["finish_reason"] if last.get("details") else None
        text = last["generated_text"] or "".join(e["token"]["text"] for e in events)
        return Answer(text, ids, finish)
    key = "delta" if spec.kind == "chat_stream" else None
    parts = [(c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
             for c in events if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in events if c["choices"]]
    return Answer("".join(parts), None, next((f for f in finishes if f), None))


def parse_json(spec: Spec, body: dict) -> Answer:
    if spec.kind == "generate":
        details = body["details"]
        return Answer(body["generated_text"], tuple(t["id"] for t in details["tokens"]),
                      details["finish_reason"])
    choice = body["choices"][0]
    text = choice["message"]["content"] if spec.kind == "chat" else choice["text"]
    return Answer(text, None, choice["finish_reason"])


async def read_stream(client: httpx.AsyncClient, spec: Spec, leave_after: int | None
                      ) -> tuple[int, list[dict]]:
    """The stream's events; with `leave_after`, the connection is closed after that many."""
    events: list[dict] = []
    async with client.stream("POST", spec.path, json=spec.body()) as r:
        if r.status_code != 200:
            await r.aread()
            raise AssertionError(f"{spec.kind}: {r.status_code} {r.text}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            events.append(json.loads(line[5:]))
            if "error" in events[-1]:
                raise AssertionError(f"{spec.kind}: in-band error {events[-1]}")
            if leave_after is not None and len(events) >= leave_after:
                break  # leaving the block closes the connection mid-stream
    return r.status_code, events


async def run(client: httpx.AsyncClient, spec: Spec, leave_after: int | None = None
              ) -> tuple[int, Answer, int]:
    """(status, answer, events received) of one request."""
    if spec.stream:
        status, events = await read_stream(client, spec, leave_after)
        return status, parse_events(spec, events), len(events)
    r = await client.post(spec.path, json=spec.body())
    assert r.status_code == 200, f"{spec.kind}: {r.status_code} {r.text}"
    return r.status_code, parse_json(spec, r.json()), 0


async def send_and_close(url: str, spec: Spec, linger: float) -> None:
    """Send the request on a raw socket and hang up before any answer can come back."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(spec.body()).encode()
    head = (f"POST {spec.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    writer.write(head + payload)
    await writer.drain()
    await asyncio.sleep(linger)
    writer.close()
    await writer.wait_closed()


# ---- the storm ----------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    statuses: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)

    def check(self, spec: Spec, got: Answer, want: Answer, received: int | None = None) -> None:
        """`received`: a stream left after that many events must match the reference so far."""
        if received is None:
            ok = got == want
        elif got.ids is not None:
            ok = want.ids is not None and got.ids == want.ids[:received]
        else:
            ok = want.text.startswith(got.text)
        if not ok:
            self.mismatches.append(f"{spec}: got {got}, alone {want}")


@dataclass(frozen=True)
class Job:
    spec: Spec
    action: str  # "complete", "leave" (after `leave_after` events) or "cancel"
    leave_after: int = 0
    linger: float = 0.0


def plan(pool: list[Spec], count: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        spec = rng.choice(pool)
        if rng.random() < CANCEL_SHARE:
            jobs.append(Job(spec, "cancel", linger=rng.choice([0.0, 0.005, 0.02])))
        elif spec.stream and rng.random() < LEAVE_SHARE:
            # Always before the last token, so the server still has work to drop.
            jobs.append(Job(spec, "leave", leave_after=rng.randint(1, spec.max_new_tokens - 2)))
        else:
            jobs.append(Job(spec, "complete"))
    return jobs


async def storm(url: str, jobs: list[Job], reference: dict[Spec, Answer], tally: Tally) -> None:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                kind = job.spec.kind
                if job.action == "cancel":
                    await send_and_close(url, job.spec, job.linger)
                    tally.outcomes[kind, "cancelled"] += 1
                    continue
                leave = job.leave_after if job.action == "leave" else None
                status, answer, received = await run(client, job.spec, leave)
                tally.statuses[status] += 1
                if leave is not None and received < leave:
                    raise AssertionError(f"{job.spec}: stream ended after {received} events")
                tally.check(job.spec, answer, reference[job.spec], leave)
                tally.outcomes[kind, "disconnected" if leave else "completed"] += 1

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))


async def alone(url: str, pool: list[Spec]) -> dict[Spec, Answer]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return {spec: (await run(client, spec))[1] for spec in pool}


# ---- server state -------------------------------------------------------------------------

GAUGES = ("tgi_queue_size", "tgi_batch_current_size", "tgserve_kv_blocks_used")
REPORTED = (*GAUGES, "tgi_request_success", "tgserve_requests_cancelled")


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            # The parser names a counter's sample `<name>_total` even where the exposition
            # writes TGI's bare name: one key for both.
            name = sample.name.removesuffix("_total")
            out[name] = out.get(name, 0.0) + sample.value
    return out


def settle(url: str, seconds: float = 60) -> dict[str, float]:
    """The metrics once every gauge is back to zero, or as they stand after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        metrics = scrape(url)
        if all(metrics[g] == 0 for g in GAUGES) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def shard_pid(server: LaunchedServer) -> int:
    for pid in server.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"shard" in argv and any(a.endswith(b"tgserve.cli") for a in argv):
            return pid
    raise AssertionError(f"no shard below the launcher: {server.children()}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ---- the test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak_server() -> Iterator[LaunchedServer]:
    server = LaunchedServer(LIMITS).start()
    yield server
    server.stop()


def test_soak(soak_server: LaunchedServer) -> None:
    url = soak_server.url
    started = time.monotonic()
    pool = specs()
    assert {s.kind for s in pool} == set(KINDS)

    reference = asyncio.run(alone(url, pool))
    # A first round: every distinct request at once, checked too, and then the RSS baseline.
    warm = Tally()
    asyncio.run(storm(url, [Job(s, "complete") for s in pool], reference, warm))
    assert warm.mismatches == [], "\n".join(warm.mismatches)
    assert all(settle(url)[g] == 0 for g in GAUGES)
    pid = shard_pid(soak_server)
    rss_before = rss_mib(pid)
    before = scrape(url)

    jobs = plan(pool, STORM, seed=5)
    tally = Tally()
    storm_started = time.monotonic()
    asyncio.run(storm(url, jobs, reference, tally))
    storm_seconds = time.monotonic() - storm_started
    after = settle(url)
    rss_after = rss_mib(pid)
    health = httpx.get(f"{url}/health").status_code

    def delta(name: str) -> float:
        return after[name] - before[name]

    by_outcome = Counter(outcome for (_, outcome) in tally.outcomes.elements())
    by_kind = {k: {o: n for (kk, o), n in sorted(tally.outcomes.items()) if kk == k}
               for k in KINDS}
    print(f"\nsoak: {len(jobs)} requests in {storm_seconds:.1f}s over {CLIENTS} clients "
          f"({time.monotonic() - started:.1f}s with the reference and warm rounds); "
          f"{dict(by_outcome)}; by kind {by_kind}; statuses {dict(tally.statuses)}; "
          f"mismatches {len(tally.mismatches)}; metrics at end "
          f"{ {name: after.get(name) for name in REPORTED} }; successes in the storm "
          f"{delta('tgi_request_success'):.0f}, cancelled "
          f"{delta('tgserve_requests_cancelled'):.0f}; "
          f"shard RSS {rss_before:.1f} -> {rss_after:.1f} MiB (margin {RSS_MARGIN_MIB} MiB); "
          f"/health {health}")

    assert tally.mismatches == [], "\n".join(tally.mismatches[:10])
    assert set(tally.statuses) == {200}
    assert sum(tally.outcomes.values()) == len(jobs)
    assert by_outcome["disconnected"] > 0 and by_outcome["cancelled"] > 0
    for gauge in GAUGES:
        assert after[gauge] == 0, f"{gauge} is {after[gauge]} after the storm settled"
    assert health == 200
    assert rss_after - rss_before <= RSS_MARGIN_MIB, (rss_before, rss_after)
    # Nothing the server finished was left over from the storm, and the left ones were let go.
    completed = by_outcome["completed"]
    assert delta("tgi_request_success") >= completed
