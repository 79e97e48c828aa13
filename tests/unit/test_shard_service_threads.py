"""Warmup's thread: off the event loop while it runs, and gone, with its OpenMP team, afterwards."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from tgserve.shard.service import TextGenerationService, run_in_own_thread


def os_threads() -> set[str]:
    """The ids of this process's OS threads. Sets, not counts: threads that earlier tests left
    behind may exit meanwhile, which would hide new threads from a count."""
    return set(os.listdir("/proc/self/task"))


def settled_threads(before: set[str], timeout_s: float = 5.0) -> set[str]:
    """The threads alive now that were not in `before`, once none is left or the timeout passes:
    an exiting thread (and the OpenMP workers it releases) leaves /proc a moment after Python's
    join returns."""
    deadline = time.monotonic() + timeout_s
    while (new := os_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return new


def test_runs_off_the_loop_thread_returns_and_raises() -> None:
    async def main() -> None:
        loop_thread = threading.current_thread()
        ran_on: list[threading.Thread] = []

        def work(x: int) -> int:
            ran_on.append(threading.current_thread())
            return x * 2

        assert await run_in_own_thread(work, 21) == 42
        assert ran_on[0] is not loop_thread
        assert not ran_on[0].is_alive()

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await run_in_own_thread(fail)

    asyncio.run(main())


def test_the_loop_keeps_answering_while_the_thread_works() -> None:
    async def main() -> None:
        release = threading.Event()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        waiting = asyncio.create_task(run_in_own_thread(release.wait, 5))
        await asyncio.sleep(0.2)
        assert ticks >= 5 and not waiting.done()
        release.set()
        assert await waiting is True
        await task

    asyncio.run(main())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_no_thread_outlives_warmup_not_even_its_openmp_team() -> None:
    """With asyncio.to_thread the executor's thread and the OpenMP worker its first parallel op
    started stay alive: libgomp then has more threads than cores and every later step is slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.ones(1 << 22)
        x.sum()  # the loop thread's own team, as the model load makes it
        before = os_threads()

        def parallel_work() -> float:
            return float((x * 2).sum())  # large enough for torch to run it on its thread team

        async def main() -> tuple[float, set[str]]:  # the path Warmup takes
            service = TextGenerationService(None, None)  # type: ignore[arg-type]
            result = await service._run(None, parallel_work, in_thread=True)  # type: ignore[arg-type]
            return result, settled_threads(before)  # while the loop (and any executor) lives

        assert asyncio.run(main()) == (2.0 * (1 << 22), set())

        async def with_executor() -> float:  # the case this guards against, as a control
            return await asyncio.to_thread(parallel_work)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(with_executor())
            time.sleep(0.5)
            assert len(os_threads() - before) >= 2  # the executor's thread and its OpenMP worker
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())  # its thread exits
            loop.close()
    finally:
        torch.set_num_threads(threads)
