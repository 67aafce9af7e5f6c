"""Buffers that fetches receive into (and the cache reads into), reused once nothing refers to them.

A fresh 8 MiB bytearray per fetched chunk is zero-filled and page-faulted in by the kernel, page by
page: measured in a 16-node fleet on this 2-core VM, those faults were 40% of the CPU of the threads
receiving chunks from nginx. A received chunk lives on after its fetch (readers' replies, the memory
tier, the cache fill, the digest), so a buffer is handed out again only when the pool's own
reference is the last one: a memoryview of it anywhere (a slice of one too) keeps it from being
overwritten. Thread-safe: fetches run in worker threads, and the last reference may be dropped on
any thread.
"""

from __future__ import annotations

import sys
import threading
import time

MIN_SIZE = 1 << 20  # smaller buffers cost little to make
KEPT = 8  # buffers kept per size: about the fetches a daemon has in flight at once
# Bytes of buffers kept in all: what the pool may add to the daemon's memory once they are idle. A
# cold S3 read fetches 32 MiB runs, so 8 of those would be 256 MiB (measured, bench/run: peak RSS 364
# against 148-156 MiB without the pool; 241 with 48 MiB kept). 32 MiB is four 8 MiB chunks, or one run.
# Room for the memory tier's chunks on top (64 MiB) measured no clear change in the fleet bench
# (32 nodes, mount: 42.2 and 46.4 s against 41.8 and 43.2 s), so the pool stays this size.
KEPT_BYTES = 32 << 20
IDLE = 30.0  # seconds a buffer nobody took stays kept: an idle daemon gives its memory back (see trim)


class ReceivePool:
    def __init__(self, kept: int = KEPT, idle: float = IDLE, kept_bytes: int = KEPT_BYTES,
                 min_size: int = MIN_SIZE) -> None:
        self.kept, self.idle, self.kept_bytes, self.min_size = kept, idle, kept_bytes, min_size
        self._free: dict[int, list[list]] = {}  # size -> [[buffer, last handed out]]
        self._bytes = 0  # of every buffer in _free
        self._lock = threading.Lock()
        self.reused = 0  # buffers handed out again (tests, and the bench's curiosity)

    def trim(self) -> int:
        """Let go of the buffers nobody took for ``idle`` seconds; the bytes let go. Called now and
        then by the daemon, so a daemon that stops fetching gives back what it kept."""
        now = time.monotonic()
        freed = 0
        with self._lock:
            for size, pool in self._free.items():
                kept = [slot for slot in pool if now - slot[1] < self.idle or sys.getrefcount(slot[0]) > 2]
                freed += size * (len(pool) - len(kept))
                pool[:] = kept
            self._bytes -= freed
        return freed

    def get(self, size: int) -> bytearray:
        """A bytearray of ``size`` bytes whose content is undefined: the caller overwrites all of it."""
        if size < self.min_size:
            return bytearray(size)
        now = time.monotonic()
        with self._lock:
            pool = self._free.setdefault(size, [])
            for slot in pool:
                # references: the slot's, and getrefcount's argument; any view of it adds one
                if sys.getrefcount(slot[0]) == 2:
                    slot[1] = now
                    self.reused += 1
                    return slot[0]
            # every slot is in use here (a free one was handed out above): nothing idle to let go;
            # trim() lets go of the idle ones
            buf = bytearray(size)
            if len(pool) < self.kept and self._bytes + size <= self.kept_bytes:
                pool.append([buf, now])
                self._bytes += size
            return buf


POOL = ReceivePool()
