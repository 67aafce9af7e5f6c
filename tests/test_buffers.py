"""Receive buffers are reused only once nothing refers to them, and let go when idle."""

from __future__ import annotations

import threading

from imgfs.buffers import MIN_SIZE, ReceivePool


def test_a_buffer_is_handed_out_again_only_when_nothing_refers_to_it():
    pool = ReceivePool(kept=2)
    a = pool.get(MIN_SIZE)
    view = memoryview(a)[10:20]  # a slice of a view (a reader's reply, a cache fill) holds it too
    addr = id(a)
    del a
    b = pool.get(MIN_SIZE)
    assert id(b) != addr and pool.reused == 0
    del view
    c = pool.get(MIN_SIZE)
    assert id(c) == addr and pool.reused == 1  # the view gone, the first buffer is free again
    assert len(pool.get(100)) == 100 and pool.reused == 1  # small ones are never pooled


def test_buffers_kept_are_bounded_and_an_idle_one_is_let_go():
    pool = ReceivePool(kept=2, idle=0.0)
    held = [pool.get(MIN_SIZE) for _ in range(5)]  # all in use: five made, two kept
    assert len(pool._free[MIN_SIZE]) == 2
    del held
    pool.get(MIN_SIZE)  # reuses one
    assert len(pool._free[MIN_SIZE]) <= 2
    pool.trim()  # with idle=0, every buffer nobody holds is let go
    assert pool._free[MIN_SIZE] == [] and pool._bytes == 0


def test_the_bytes_kept_are_bounded_whatever_the_sizes():
    pool = ReceivePool(kept=8, kept_bytes=3 * MIN_SIZE)
    held = [pool.get(MIN_SIZE) for _ in range(5)] + [pool.get(2 * MIN_SIZE) for _ in range(2)]
    assert sum(size * len(slots) for size, slots in pool._free.items()) <= 3 * MIN_SIZE
    del held


def test_threads_never_get_the_same_free_buffer():
    pool = ReceivePool(kept=4)
    got: list[int] = []
    lock = threading.Lock()
    live = []

    def take():
        buf = pool.get(MIN_SIZE)
        with lock:
            got.append(id(buf))
            live.append(buf)  # still in use: nobody else may have it

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8


def test_trim_lets_idle_buffers_go_and_keeps_those_in_use():
    pool = ReceivePool(kept=4, idle=0.0)
    held = pool.get(MIN_SIZE)
    idle = pool.get(MIN_SIZE)
    del idle
    assert pool.trim() == MIN_SIZE
    assert [slot[0] is held for slot in pool._free[MIN_SIZE]] == [True]
    del held
    assert pool.trim() == MIN_SIZE and pool._bytes == 0
