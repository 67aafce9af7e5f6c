"""A bytes-bounded LRU of immutable values with single-flight loading.

The qcow2 decoder keeps L2 tables and inflated clusters here. Bounded by the *sum of value sizes*, not
a count, because one entry can be 512 bytes or 2 MiB depending on the image's cluster size. Loads of
the same key that overlap in time share one load (a ``trio.Event``), so N readers of one cold cluster
cause one fetch and one inflate, not N.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

import trio


class LoadingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[Hashable, trio.Event] = {}
        self.loads = 0  # how many times a loader ran (tests and metrics)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def peek(self, key: Hashable) -> bytes | None:
        """The value if cached (and mark it recently used), else None; never loads."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[key] = value
        self._bytes += len(value)
        # Always keep the newest entry even if it alone exceeds the budget: a cache that cannot hold
        # the value just loaded would make every waiter of a single-flight load fetch it again.
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)

    async def get(self, key: Hashable, load: Callable[[], Awaitable[bytes]]) -> bytes:
        while True:
            value = self.peek(key)
            if value is not None:
                return value
            event = self._inflight.get(key)
            if event is None:
                break
            # Someone is loading it. If their load fails (or the value is evicted before we look),
            # we loop and become the loader ourselves: each caller sees its own error, none hangs.
            await event.wait()
        event = self._inflight[key] = trio.Event()
        try:
            self.loads += 1
            value = await load()
            if self.max_bytes > 0:
                self.put(key, value)
            return value
        finally:
            del self._inflight[key]
            event.set()
