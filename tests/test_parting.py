"""What a planned hand-over leaves for the next process: the sealed memfd (handover/parting.py) and
the catalog's last listing in it (Catalog.snapshot / restore), against a real notify socket."""

from __future__ import annotations

import array
import os
import socket

import pytest
import trio

from imgfs.catalog import Catalog
from imgfs.handover import parting
from imgfs.model import Location


class FileBackend:
    """A backend whose listing the test sets."""

    def __init__(self, name: str, locations: list[Location]) -> None:
        self.name, self.locations = name, locations

    def list_images(self) -> list[Location]:
        return list(self.locations)

    def stat(self, image_id: str) -> Location | None:
        return next((loc for loc in self.locations if loc.image_id == image_id), None)


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A service manager's notify socket: the messages and fds sent to it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def received() -> list[tuple[str, list[int]]]:
        out = []
        sock.setblocking(False)
        while True:
            try:
                msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return out
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            out.append((msg.decode(), list(fds)))

    yield received
    sock.close()


def test_what_is_left_is_sealed_stored_and_taken_once(notify_socket):
    data = os.urandom(3 << 20)
    assert parting.leave("catalog", data)
    (removed, none), (stored, fds) = notify_socket()
    assert removed == "FDSTOREREMOVE=1\nFDNAME=catalog" and none == []
    assert stored == "FDSTORE=1\nFDNAME=catalog" and len(fds) == 1
    with pytest.raises(PermissionError):  # sealed: nobody changes it on the way
        os.pwrite(fds[0], b"x", 0)
    handed = {"catalog": fds[0], "fuse": 99}
    assert parting.take(handed, "catalog") == data
    assert handed == {"fuse": 99}
    assert notify_socket() == [("FDSTOREREMOVE=1\nFDNAME=catalog", [])]  # a later crash starts afresh
    with pytest.raises(OSError):
        os.fstat(fds[0])  # closed


def test_an_fd_that_is_not_a_sealed_memfd_is_not_read(notify_socket, caplog):
    r, w = os.pipe()
    os.write(w, b"{}")
    assert parting.take({"catalog": r}, "catalog") is None
    assert "not a sealed memfd" in caplog.text
    os.close(w)


def catalog(backends) -> Catalog:
    return Catalog(backends, refresh_interval=60, negative_ttl=1, limiter=trio.CapacityLimiter(2))


async def test_a_catalog_restored_from_a_snapshot_shows_what_the_last_one_listed():
    a = [Location("a", f"img{i}", 1000 + i, f"v{i}", 1.5 * i) for i in range(50)]
    b = [Location("b", "img3", 1003, "other", 7.0)]
    old = catalog([FileBackend("a", a), FileBackend("b", b)])
    await old.refresh()
    blob = old.snapshot()
    new = catalog([FileBackend("b", []), FileBackend("a", []), FileBackend("c", [])])  # c: new in this config
    assert await new.restore(blob) == 50
    assert new.image_ids() == old.image_ids()
    assert new.location("a", "img7") == a[7]
    assert new.location("b", "img3") == b[0]
    assert new.image("img3").locations == (b[0], a[3])  # this config's preference order


@pytest.mark.parametrize("blob", [b"not json", b'{"layout": 99}', b'{"layout": 1, "stores": {"a": [["x"]]}}',
                                  b'{"layout": 1, "stores": {"a": [[1, "big", "v", 0]]}, "glance": null}'])
async def test_a_snapshot_that_does_not_parse_is_ignored_with_one_line(blob, caplog):
    new = catalog([FileBackend("a", [])])
    assert await new.restore(blob) == 0
    assert new.image_ids() == []
    assert "ignoring the listing the last imgfs left" in caplog.text
