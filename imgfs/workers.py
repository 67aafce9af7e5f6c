"""Worker threads for the blocking calls of the read path: a store's GET, a cache file's read or fill.

``trio.to_thread.run_sync`` costs ~200 µs of CPU per call on this 2-core VM (measured: 20,000 calls of a
function that returns at once). Part of it is the two wake-ups, which any hand-off pays; the rest is
what trio does per call for generality: naming the OS thread (a ``prctl`` in and out), copying the
context, a cancel scope and an outcome wrapped twice. A random 4 KiB read that misses pays for two
hand-offs (the GET, the fill), a warm one whose block is not in the page cache for one.

So the read path hands its calls to a few long-lived threads through a ``queue.SimpleQueue`` and is
woken by ``run_sync_soon`` + ``reschedule``: ~130 µs a call in the same measurement. Each thread
(trio's ``start_thread_soon``, named once) belongs to a task of the daemon's nursery that ends with it,
so none outlives the daemon: when the nursery is cancelled, the task tells its thread to stop after the
call it is in. A thread is started when a call finds none waiting (callers bound their own concurrency
with their limiters), and stops after ``IDLE`` seconds without work. A call that may be abandoned (a store that
hangs) leaves its thread to finish on its own, as trio's does; the next call starts another.

Calls made before ``attach`` (tests, a daemon still starting) go through ``trio.to_thread``. Knows
nothing of stores, the cache or FUSE.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import outcome
import trio

T = TypeVar("T")

IDLE = 10.0  # seconds a thread waits for work before it stops (trio's own thread cache keeps 10)
_STOP = None


@dataclass(eq=False)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    token: trio.lowlevel.TrioToken
    task: trio.lowlevel.Task
    abandoned: bool = False


@dataclass
class WorkerStats:
    calls: int = 0
    threads_started: int = 0
    abandoned: int = 0


class Workers:
    def __init__(self, idle: float = IDLE) -> None:
        self.idle = idle
        self.stats = WorkerStats()
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # threads blocked on the queue, ready for a call
        self._threads = 0
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Threads are started as tasks of ``nursery``; until then calls go through trio.to_thread."""
        self._nursery = nursery

    @property
    def threads(self) -> int:
        return self._threads

    async def run(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        """``fn(*args)`` in a worker thread, as ``trio.to_thread.run_sync`` would run it: its result or
        its exception. Cancelled: waits for the call to end, unless ``abandon_on_cancel``."""
        nursery = self._nursery
        # stopping: a call queued now could land behind the stop signals of busy threads
        if nursery is None or nursery.cancel_scope.cancel_called:
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        with self._lock:
            start = self._waiting == 0
            if start:
                self._threads += 1
            else:
                self._waiting -= 1  # that thread is this call's: a second call must not count on it too
        if start and not self._start(nursery, call.token):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
        self._queue.put(call)
        self.stats.calls += 1

        def abort(_: Any) -> trio.lowlevel.Abort:
            if not abandon_on_cancel:
                return trio.lowlevel.Abort.FAILED
            call.abandoned = True
            self.stats.abandoned += 1
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _start(self, nursery: trio.Nursery, token: trio.lowlevel.TrioToken) -> bool:
        """A thread, owned by a new task of ``nursery``; False if the nursery takes no more (stopping)."""
        ended = trio.Event()
        try:
            nursery.start_soon(self._own, ended)
        except RuntimeError:  # the nursery is closed: the daemon is stopping
            with self._lock:
                self._threads -= 1
            return False
        self.stats.threads_started += 1

        def gone(_: outcome.Outcome) -> None:  # in the thread, as it ends
            with self._lock:
                self._threads -= 1
            try:
                token.run_sync_soon(ended.set)
            except trio.RunFinishedError:
                pass

        # started here, not by the task, so that a call queued for it is never left without a thread
        trio.lowlevel.start_thread_soon(self._work, gone, name="imgfs worker")
        return True

    async def _own(self, ended: trio.Event) -> None:
        """The task a thread belongs to: it ends with the thread, or, cancelled, stops it after the call
        it is in (a call that may not be abandoned is waited for by its caller)."""
        try:
            await ended.wait()
        except trio.Cancelled:
            self._queue.put(_STOP)
            raise

    def _work(self) -> None:
        """A thread's life: one call, then wait for the next (counted as waiting from the moment it
        is ready, so ``run`` starts no thread it does not need)."""
        get = self._queue.get
        while True:
            try:
                call = get(timeout=self.idle)
            except queue.Empty:
                with self._lock:
                    # only a thread nobody counts on may stop: ``run`` may have just taken this one
                    if self._waiting > 0:
                        self._waiting -= 1
                        return
                continue
            if call is _STOP:
                return
            result = outcome.capture(call.fn, *call.args)
            with self._lock:
                self._waiting += 1
            try:
                call.token.run_sync_soon(_deliver, call, result)
            except trio.RunFinishedError:  # the loop is gone: nobody to tell
                return


def _deliver(call: _Call, result: outcome.Outcome) -> None:
    if not call.abandoned:
        trio.lowlevel.reschedule(call.task, result)
