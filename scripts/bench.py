"""`make bench`: tgserve against llama.cpp and vLLM on one model, one server at a time.

Each server is started alone on a loopback port, checked with one greedy completion, measured
with `tgserve benchmark` (streamed /v1/completions, closed loop) and stopped before the next
starts, so that none shares the CPU with another. That is done in --rounds rounds (2), the order
mirrored each time (tgserve, llama.cpp, vLLM, then vLLM, llama.cpp, tgserve), so that the drift of
a shared machine's speed between windows of a few minutes weighs on every server alike; each
server's rounds are pooled (tgserve/benchmark/rounds.py) and the per-server reports merged into
bench-results/benchmark.{json,png} and one side-by-side table.

  .venv/bin/python scripts/bench.py [--servers tgserve,llama.cpp,vllm] [--out-dir bench-results]

The peers come from `make peers` (scripts/peers.sh), under $TGSERVE_PEERS_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tgserve.benchmark.rounds import pool_rounds, round_order

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(
    os.environ.get("TGSERVE_PEERS_DIR") or Path.home() / ".cache" / "tgserve" / "peers"
)
GGUF_F32 = PEERS_DIR / "models" / "smollm2-135m-instruct-f32.gguf"
HF_F32 = PEERS_DIR / "models" / "smollm2-135m-instruct-f32"
LLAMA_SERVER = PEERS_DIR / "llama.cpp" / "bin" / "llama-server"
VLLM = PEERS_DIR / "vllm" / "venv" / "bin" / "vllm"
TGSERVE = ROOT / ".venv" / "bin" / "tgserve"
MODEL_NAME = "smollm2-135m-instruct"
SAMPLE_PROMPT = "The capital of France is"
SAMPLE_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """How to start one server on `port` and what it needs to exist first."""

    name: str
    command: Callable[[int], list[str]]
    needs: tuple[Path, ...]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0


def tgserve_command(port: int) -> list[str]:
    uds = os.path.join(tempfile.gettempdir(), f"tgserve-bench-{os.getpid()}")
    return [
        str(TGSERVE), "--hostname", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()), "--master-port", str(free_port()),
        "--shard-uds-path", uds, "--dtype", "float32",
        # float32 weights and arithmetic, K and V stored in float16: llama-server's default cache
        # type (f16) for its F32 model, so both keep the same bytes per cached token.
        "--kv-cache-dtype", "float16",
    ]  # fmt: skip


def llama_command(port: int) -> list[str]:
    return [
        str(LLAMA_SERVER), "-m", str(GGUF_F32), "--alias", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "-np", "16", "-c", "16384", "-t", "2", "--cont-batching",
        # Engines are compared without prompt reuse (each level has its own prompts anyway).
        "--no-cache-prompt", "--cache-ram", "0", "--no-webui",
    ]  # fmt: skip


def vllm_command(port: int) -> list[str]:
    return [
        str(VLLM), "serve", str(HF_F32), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "4096", "--no-enable-prefix-caching",
    ]  # fmt: skip


SERVERS = {
    # TGI's PREFIX_CACHING switch: off, like the peers' prompt caches.
    "tgserve": Server("tgserve", tgserve_command, (TGSERVE,), env={"PREFIX_CACHING": "0"}),
    "llama.cpp": Server("llama.cpp", llama_command, (LLAMA_SERVER, GGUF_F32)),
    "vllm": Server(
        "vLLM",
        vllm_command,
        (VLLM, HF_F32 / "model.safetensors"),
        # vLLM reserves one core for its front end unless told not to: this machine may have two.
        env={
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "2",
        },
        startup_timeout_s=900.0,
    ),
}


@dataclass
class Running:
    server: Server
    port: int
    process: subprocess.Popen
    log_path: Path
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start(server: Server, out_dir: Path) -> Running:
    port = free_port()
    command = server.command(port)
    log_path = out_dir / "server.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"{server.name}: starting: {' '.join(command)}")
    env = {**os.environ, "TQDM_DISABLE": "1", **server.env}
    process = subprocess.Popen(
        command,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: stopping it stops all its children
    )
    running = Running(server, port, process, log_path)
    started = time.monotonic()
    deadline = started + server.startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {process.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"{running.url}/health", timeout=2, trust_env=False).status_code == 200:
                running.startup_s = time.monotonic() - started
                log(f"{server.name}: healthy after {running.startup_s:.0f}s (pid {process.pid})")
                return running
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(running)
    raise RuntimeError(f"{server.name} not healthy after {server.startup_timeout_s}s")


def stop(running: Running, timeout_s: float = 60.0) -> None:
    if running.process.poll() is None:
        os.killpg(running.process.pid, signal.SIGTERM)
        try:
            running.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()
    # Children that outlived their parent (e.g. a vLLM engine core) go with their group.
    try:
        os.killpg(running.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log(f"{running.server.name}: stopped")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def sample_completion(running: Running) -> str:
    """One greedy completion: the servers hold the same weights, so the texts should agree."""
    response = httpx.post(
        f"{running.url}/v1/completions",
        json={
            "model": MODEL_NAME,
            "prompt": SAMPLE_PROMPT,
            "max_tokens": SAMPLE_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=120,
        trust_env=False,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def measure(running: Running, out_dir: Path, args: argparse.Namespace) -> None:
    command = [
        str(TGSERVE), "benchmark", "--url", running.url, "--name", running.server.name,
        "--server-pid", str(running.process.pid), "--api", "openai",
        "--concurrency", args.concurrency, "--num-requests", args.num_requests,
        "--num-prompts", "64", "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos",
        "--idle-cpu-seconds", str(args.idle_cpu_seconds), "--out-dir", str(out_dir),
    ]  # fmt: skip
    log(f"{running.server.name}: measuring")
    subprocess.run(command, check=True, stdout=(out_dir / "table.txt").open("w"))


def annotate(out_dir: Path, running: Running, sample: str) -> None:
    """Adds how the server ran to its report; merging keeps these fields."""
    path = out_dir / "benchmark.json"
    data = json.loads(path.read_text())
    for server in data["servers"]:
        server["command"] = " ".join(running.server.command(running.port))
        server["startup_s"] = round(running.startup_s, 1)
        server["sample_prompt"] = SAMPLE_PROMPT
        server["sample_completion"] = sample
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_one(server: Server, out_dir: Path, args: argparse.Namespace) -> str:
    missing = [str(p) for p in server.needs if not p.exists()]
    if missing:
        raise RuntimeError(f"{server.name}: missing {', '.join(missing)}: run `make peers` first")
    running = start(server, out_dir)
    try:
        sample = sample_completion(running)
        log(f"{server.name}: greedy sample {sample!r}")
        measure(running, out_dir, args)
        annotate(out_dir, running, sample)
        return sample
    finally:
        stop(running)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default="tgserve,llama.cpp,vllm", help="comma-separated, in order")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench-results")
    p.add_argument("--concurrency", default="1,4,16,64")
    # c=1 is slow and steady: 8 requests of 128 tokens give ~1000 inter-token gaps.
    p.add_argument("--num-requests", default="8,16,64,64", help="per --concurrency level")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--idle-cpu-seconds", type=float, default=10.0)
    # Speed drifts between windows of a few minutes on a shared machine: two rounds in mirrored
    # order give each server the same mix of windows (tgserve.benchmark.rounds).
    p.add_argument("--rounds", type=int, default=2, help="rounds, the order mirrored each time")
    return p.parse_args(argv)


def pool(folder: Path, round_folders: list[Path]) -> None:
    """The server's rounds as one benchmark.json in `folder` (tgserve.benchmark.rounds)."""
    reports = [json.loads((f / "benchmark.json").read_text()) for f in round_folders]
    report = reports[0]
    report["servers"] = [pool_rounds([r["servers"][0] for r in reports])]
    (folder / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        print(f"unknown servers {unknown}; choose from {list(SERVERS)}", file=sys.stderr)
        return 2
    began = time.monotonic()
    samples: dict[str, set[str]] = {SERVERS[n].name: set() for n in names}
    rounds: dict[str, list[Path]] = {n: [] for n in names}
    for number, order in enumerate(round_order(names, args.rounds), start=1):
        for name in order:
            folder = args.out_dir / name / f"round{number}"
            log(f"round {number} of {args.rounds}: {name}")
            samples[SERVERS[name].name].add(run_one(SERVERS[name], folder, args))
            rounds[name].append(folder)
    for name in names:
        pool(args.out_dir / name, rounds[name])
    folders = [str(args.out_dir / name) for name in names]
    merge = [str(TGSERVE), "benchmark", "merge", *folders, "--out-dir", str(args.out_dir)]
    subprocess.run(merge, check=True)
    print(f"\ngreedy {SAMPLE_TOKENS} tokens after {SAMPLE_PROMPT!r}:")
    for name, texts in samples.items():
        print(f"  {name:>10}: {' / '.join(repr(t) for t in sorted(texts))}")
    if len({text for texts in samples.values() for text in texts}) > 1:
        print("  (the texts differ: float32 rounding differs between engines)")
    log(f"done in {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
