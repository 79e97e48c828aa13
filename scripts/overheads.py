"""What a decode step pays outside its arithmetic on this machine, each measured alone.

Usage: .venv/bin/python scripts/overheads.py [--only transport,stream,contention]

- transport: one round trip between two processes over a Unix socket, as the router and a shard
  make one per step: a plain asyncio echo (the floor), a gRPC unary call (what Decode is) and
  one message each way on an open gRPC bidirectional stream. Wall time and the client's CPU.
- stream: the weights of one batch-1 decode step (30 Llama layers of SmolLM2-135M's shape)
  through the packed linear, one op at a time, against one linear as large as all of them and a
  plain read (sum) of the same bytes: what splitting the stream into 120 ops costs.
- contention: the engine's batch-1 decode step alone, then with another process taking a short
  burst of CPU every few tens of milliseconds, as the router and the client do on shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def _timed(n: int, fn: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(wall, CPU) seconds per call of `fn`, after a tenth as many warm-up calls."""
    for _ in range(n // 10):
        await fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def _echo_server(path: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path)
        await server.serve_forever()

    asyncio.run(main())


def _grpc_server(path: str) -> None:
    import grpc

    async def unary(request: bytes, context: object) -> bytes:
        return request

    async def bidi(requests, context):  # type: ignore[no-untyped-def]
        async for message in requests:
            yield message

    async def main() -> None:
        same = lambda b: b  # noqa: E731 - raw bytes both ways, no protobuf
        handler = grpc.method_handlers_generic_handler("overheads.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
            "Stream": grpc.stream_stream_rpc_method_handler(bidi, same, same),
        })
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _in_process(target: Callable[[str], None], path: str) -> mp.Process:
    process = mp.get_context("spawn").Process(target=target, args=(path,), daemon=True)
    process.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def transport(n: int = 2000) -> None:
    import grpc

    payload = b"x" * 200  # about a one-row Decode answer
    with tempfile.TemporaryDirectory() as folder:
        echo = _in_process(_echo_server, os.path.join(folder, "echo.sock"))
        served = _in_process(_grpc_server, os.path.join(folder, "grpc.sock"))

        async def measure() -> list[tuple[str, float, float]]:
            reader, writer = await asyncio.open_unix_connection(os.path.join(folder, "echo.sock"))

            async def echo_once() -> None:
                writer.write(payload)
                await reader.read(4096)

            same = lambda b: b  # noqa: E731
            channel = grpc.aio.insecure_channel(f"unix://{os.path.join(folder, 'grpc.sock')}")
            unary = channel.unary_unary("/overheads.Echo/Unary", same, same)
            call = channel.stream_stream("/overheads.Echo/Stream", same, same)()

            async def unary_once() -> None:
                await unary(payload)

            async def stream_once() -> None:
                await call.write(payload)
                await call.read()

            rows = [("asyncio echo (floor)", *await _timed(n, echo_once)),
                    ("gRPC unary call", *await _timed(n, unary_once)),
                    ("gRPC stream message", *await _timed(n, stream_once))]
            await call.done_writing()
            await channel.close()
            writer.close()
            return rows

        try:
            rows = asyncio.run(measure())
        finally:
            echo.terminate()
            served.terminate()
    print(f"\ntransport: one round trip over a Unix socket, {n} times")
    for name, wall, cpu in rows:
        print(f"  {name:<22} {wall * 1e6:7.0f} us wall  {cpu * 1e6:7.0f} us client CPU")


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def stream(rounds: int = 15) -> None:
    import torch

    from tgserve.shard.kernels import build
    from tgserve.shard.kernels import linear as kernel_linear

    if not build.available():
        print("\nstream: the C++ kernels are not available here")
        return
    torch.manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
    layers = [[(kernel_linear.pack_linear_weight(torch.randn(n, k)), n, torch.randn(1, k))
               for n, k in shapes] for _ in range(30)]
    total = sum(n * k * 4 for n, k in shapes) * 30

    def per_op() -> None:
        for layer in layers:
            for packed, n, x in layer:
                kernel_linear.packed_linear(x, packed, n)

    per_op_ms = _median_ms(per_op, rounds)
    flat = torch.cat([p.flatten() for layer in layers for p, _, _ in layer])
    sum_ms = _median_ms(flat.sum, rounds)
    layers.clear()
    rows = total // (576 * 4) // 16 * 16
    one = kernel_linear.pack_linear_weight(torch.randn(rows, 576))
    x = torch.randn(1, 576)
    one_ms = _median_ms(lambda: kernel_linear.packed_linear(x, one, rows), rounds)
    print(f"\nstream: {total / 2**20:.0f} MiB of weights at batch 1, median of {rounds}")
    for name, ms in (("120 linears, one per op", per_op_ms), ("one linear of all rows", one_ms),
                     ("plain read (sum)", sum_ms)):
        print(f"  {name:<26} {ms:6.1f} ms  {total / ms / 1e6:5.1f} GB/s")


def _burn(busy_ms: float, period_ms: float) -> None:
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < busy_ms / 1e3:
            pass
        time.sleep(period_ms / 1e3)


def contention(steps: int = 48, busy_ms: float = 2.4, period_ms: float = 25.0) -> None:
    from tgserve.launcher.weights import resolve_model

    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    from engine_bench import tgserve_decode  # the engine's batch-1 steps, timed the same way

    from tests.golden.harness import Harness

    source = resolve_model(None, None, None, Path.home() / ".cache" / "tgserve")
    h = Harness(source.path, num_blocks=64, gguf_file=source.gguf_file)

    def step_ms() -> float:
        tokens_per_s, _ = tgserve_decode(h, 1, 256, steps)
        return 1e3 / tokens_per_s

    share = busy_ms / (busy_ms + period_ms)
    print(f"\ncontention: batch-1 decode step at 256 positions, median of {steps}, alternating")
    for _ in range(2):
        alone = step_ms()
        burner = mp.get_context("spawn").Process(target=_burn, args=(busy_ms, period_ms),
                                                 daemon=True)
        burner.start()
        try:
            shared = step_ms()
        finally:
            burner.terminate()
        print(f"  alone {alone:5.1f} ms   with {busy_ms} ms of CPU taken every {period_ms} ms "
              f"({share:.0%} of a core): {shared:5.1f} ms ({shared / alone - 1:+.0%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="transport,stream,contention")
    args = p.parse_args()
    parts = {"transport": transport, "stream": stream, "contention": contention}
    for name in args.only.split(","):
        parts[name.strip()]()


if __name__ == "__main__":
    main()
