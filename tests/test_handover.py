"""The hand-over state and the FUSE INIT it carries (imgfs/handover): what one process writes, the
next one reads back exactly, a kill in the middle of a write included; what it cannot use, it says."""

from __future__ import annotations

import os
import struct

import pytest

from imgfs.handover.connection import FuseConnectionError, Init
from imgfs.handover.state import DIR_TAG, JOURNAL, SLOTS, State, StateError


def init_request(minor: int = 45, flags: int = 1 << 30, flags2: int = 1 << 7) -> bytes:
    body = struct.pack("<IIIII", 7, minor, 128 * 1024, flags, flags2) + bytes(44)
    header = struct.pack("<IIQQIIIHH", 40 + len(body), 26, 2, 0, 0, 0, 0, 0, 0)
    return header + body


def test_a_successor_reads_back_every_inode_and_open_handle():
    first = State.create(init_request(), b"f" * 32)
    first.add_inode(16, ["s", "store-a"])
    first.add_inode(1024, ["f", None, "img-1", False])
    first.add_inode(1025, ["f", None, "img-1", True])
    a, b, d = first.open(1024, 111), first.open(1025, 222), first.open(2, DIR_TAG)
    first.close(b)
    nxt = State.adopt(os.dup(first.fd))
    assert (nxt.fingerprint, nxt.init) == (b"f" * 32, init_request())
    assert nxt.inodes() == [(16, ["s", "store-a"]), (1024, ["f", None, "img-1", False]), (1025, ["f", None, "img-1", True])]
    assert nxt.handle(a) == (1024, 111) and nxt.handle(d) == (2, DIR_TAG) and nxt.handle(b) is None
    # a new handle never takes one still open; the freed one is used again
    assert nxt.open(1024, 333) == b
    assert nxt.open(1024, 333) not in (a, b, d)
    nxt.add_inode(1026, ["l", "debian"])
    assert State.adopt(nxt.fd).inodes()[-1] == (1026, ["l", "debian"])


def test_a_record_torn_by_a_kill_is_dropped_and_written_over():
    state = State.create(init_request(), b"f" * 32)
    state.add_inode(1024, ["f", None, "a", False])
    end = os.fstat(state.fd).st_size
    os.pwrite(state.fd, b"\x20\x00\x00\x00garbage", end)  # a length, then the kill
    nxt = State.adopt(state.fd)
    assert nxt.inodes() == [(1024, ["f", None, "a", False])]
    nxt.add_inode(1025, ["f", None, "b", False])
    assert [ino for ino, _ in State.adopt(state.fd).inodes()] == [1024, 1025]


def test_the_state_cannot_be_cut_short_and_refuses_what_is_not_ours():
    state = State.create(init_request(), b"f" * 32)
    with pytest.raises(OSError):
        os.ftruncate(state.fd, JOURNAL - 1)  # sealed: it only grows
    other = os.memfd_create("other")
    os.write(other, b"not a state" * 100)
    with pytest.raises(StateError, match="not imgfs's layout"):
        State.adopt(other)
    with pytest.raises(StateError, match="empty"):
        State.adopt(os.memfd_create("empty"))


def test_handles_run_out_with_an_error_not_a_reused_live_one():
    state = State.create(init_request(), b"f" * 32)
    state._top = SLOTS  # every slot was used once and is open
    with pytest.raises(StateError, match="no handle left"):
        state.open(1024, 1)


def test_init_is_parsed_and_a_request_that_is_not_one_refused():
    init = Init.parse(init_request())
    assert (init.minor, init.resend) == (45, True)
    assert not Init.parse(init_request(minor=38, flags=0, flags2=0)).resend
    with pytest.raises(FuseConnectionError, match="not an INIT"):
        Init.parse(init_request()[:-1])
    with pytest.raises(FuseConnectionError, match="too short"):
        Init.parse(b"\0" * 20)
