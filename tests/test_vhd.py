"""The fixed-VHD footer: which of its two sizes is the disk (as qemu's block/vpc.c decides), and every
footer that cannot be trusted refused with a reason."""

from __future__ import annotations

import struct

import pytest

from imgfs.formats import FormatUnsupported, VhdError, parse_vhd_footer


def footer(*, creator: bytes = b"win ", current: int = 1 << 20, chs=(20, 4, 17), disk_type: int = 2) -> bytes:
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQ", f, 8, 2, 0x00010000, 0xFFFFFFFFFFFFFFFF)
    f[28:32] = creator
    struct.pack_into(">QQ", f, 40, current, current)
    struct.pack_into(">HBBI", f, 56, *chs, disk_type)
    struct.pack_into(">I", f, 64, (~sum(f)) & 0xFFFFFFFF)
    return bytes(f)


def test_hyper_v_and_others_are_their_current_size():
    assert parse_vhd_footer(footer(creator=b"win "), (1 << 20) + 512).virtual_size == 1 << 20
    assert parse_vhd_footer(footer(creator=b"qem2"), (1 << 20) + 4096).virtual_size == 1 << 20


def test_virtual_pc_and_old_qemu_disks_are_their_geometry_unless_it_is_the_largest():
    got = parse_vhd_footer(footer(creator=b"vpc ", chs=(20, 4, 17)), (1 << 20) + 512)
    assert got.virtual_size == 20 * 4 * 17 * 512 and got.sized_by == "geometry"
    big = 65535 * 16 * 255 * 512 + 4096
    got = parse_vhd_footer(footer(creator=b"qemu", current=big, chs=(65535, 16, 255)), big + 512)
    assert got.virtual_size == big and got.sized_by == "current size"


@pytest.mark.parametrize("bad, says", [
    (lambda: footer()[:-1], "too small"),
    (lambda: b"x" * 512, "no footer"),
    (lambda: footer()[:48] + b"\1" + footer()[49:], "checksum"),
    (lambda: footer(disk_type=5), "unknown disk type"),
    (lambda: footer(current=1 << 30), "the file holds"),
])
def test_untrusted_footers_are_refused_with_the_reason(bad, says):
    data = bad()
    file_size = (1 << 20) + 512 if len(data) == 512 else len(data)  # a short one: the whole file
    with pytest.raises(VhdError, match=says):
        parse_vhd_footer(data, file_size)


@pytest.mark.parametrize("disk_type, says", [(3, "dynamic"), (4, "differencing")])
def test_dynamic_and_differencing_vhds_are_unsupported_not_malformed(disk_type, says):
    with pytest.raises(FormatUnsupported, match=says):
        parse_vhd_footer(footer(disk_type=disk_type), (1 << 20) + 512)
