"""The read path's worker threads (imgfs.workers): results and errors as trio.to_thread gives them,
cancellation, reuse, and no thread left once the daemon's nursery ends."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from imgfs.workers import Workers


def live_workers() -> int:
    return sum(t.name == "imgfs worker" for t in threading.enumerate())


def test_results_errors_and_reuse():
    async def main():
        workers = Workers()
        async with trio.open_nursery() as nursery:
            workers.attach(nursery)
            assert await workers.run(lambda a, b: a + b, 2, 3) == 5
            with pytest.raises(KeyError, match="missing"):
                await workers.run({}.__getitem__, "missing")
            idents = {await workers.run(threading.get_ident) for _ in range(200)}
            assert threading.get_ident() not in idents
            assert workers.stats.threads_started == 1 and len(idents) == 1  # one caller at a time: one thread
            nursery.cancel_scope.cancel()
        return workers

    workers = trio.run(main)
    assert workers.threads == 0 or wait_until(lambda: workers.threads == 0)


def test_concurrent_callers_get_threads_of_their_own():
    async def main():
        workers = Workers()
        barrier = threading.Barrier(4, timeout=10)  # only passes if four calls run at once
        async with trio.open_nursery() as nursery:
            workers.attach(nursery)
            async with trio.open_nursery() as callers:
                for _ in range(4):
                    callers.start_soon(workers.run, barrier.wait)
            assert workers.stats.threads_started == 4
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_cancelled_call_is_waited_for_unless_it_may_be_abandoned():
    async def main():
        workers = Workers()
        async with trio.open_nursery() as nursery:
            workers.attach(nursery)
            with trio.move_on_after(0.05):
                await workers.run(time.sleep, 0.5)
            waited = trio.current_time()
            with trio.move_on_after(0.05):
                await workers.run(time.sleep, 0.5, abandon_on_cancel=True)
            abandoned = trio.current_time() - waited
            assert abandoned < 0.3 and workers.stats.abandoned == 1
            assert await workers.run(lambda: "next") == "next"  # another thread takes the next call
            nursery.cancel_scope.cancel()
        return waited

    started = time.monotonic()
    trio.run(main)
    assert time.monotonic() - started >= 0.5  # the first call ran to its end


def test_threads_end_with_the_nursery_and_when_idle():
    assert wait_until(lambda: live_workers() == 0)  # an earlier test's abandoned call may still run
    async def main():
        workers = Workers(idle=0.2)
        async with trio.open_nursery() as nursery:
            workers.attach(nursery)
            async with trio.open_nursery() as callers:
                for _ in range(3):
                    callers.start_soon(workers.run, time.sleep, 0.1)
            assert live_workers() == 3
            await trio.sleep(0.6)
            assert live_workers() == 0 and workers.threads == 0  # idle ones stopped
            await workers.run(time.sleep, 0.01)
            assert live_workers() == 1
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert wait_until(lambda: live_workers() == 0)


def test_without_a_nursery_calls_go_through_trio_to_thread():
    async def main():
        workers = Workers()
        assert await workers.run(threading.current_thread) is not threading.current_thread()
        assert workers.stats.calls == 0

    trio.run(main)


def wait_until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()
