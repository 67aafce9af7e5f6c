"""Bounded decompression of one qcow2 compressed cluster (zlib raw deflate or zstd).

Pure, synchronous functions meant to run in a worker thread. Output is bounded *by construction*, never
by trusting a header: the caller gets exactly ``cluster_size`` bytes or an ``InflateError``. A stream
that would produce more than one cluster is an error too (qemu silently stops at one cluster; we refuse,
because such a stream cannot have been written by qemu and the extra bytes mean the image is crafted).

The compressed input is the descriptor's sector-rounded span, so it may end with bytes that belong to
the *next* compressed cluster: trailing input after the stream ends is expected and ignored.

Deflate goes through ISA-L (python-isal's zlib-compatible module): 553 against zlib's 268 MB/s of
output on qemu's 64 KiB clusters here, and inflating is most of what a compressed image's raw disk
costs. Its one difference is stricter: a stream reaching further back than the 4 KiB window qemu
compresses with is refused (zlib lets it read the output buffer), and qemu never writes one.
"""

from __future__ import annotations

import struct

import zstandard
from isal import isal_zlib


class InflateError(ValueError):
    """The compressed bytes do not decode to exactly one cluster."""


# zstd frames qemu writes need a window no larger than one cluster (<= 2 MiB); a crafted frame header
# asking for a huge window must not make the decoder allocate it.
ZSTD_MAX_WINDOW = 8 << 20

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # ..0x184D2A5F


def inflate_zlib(data: bytes, cluster_size: int) -> bytes:
    # qemu writes raw deflate (no zlib header) with a 4 KiB window: inflateInit2(&strm, -12).
    d = isal_zlib.decompressobj(-12)
    try:
        out = d.decompress(data, cluster_size)
        if len(out) < cluster_size:
            raise InflateError(f"deflate stream gives {len(out)} bytes, expected {cluster_size}")
        # Bounded probe: one more byte of output means the stream holds more than one cluster.
        if not d.eof and d.decompress(d.unconsumed_tail, 1):
            raise InflateError(f"deflate stream gives more than one cluster ({cluster_size} bytes)")
    except isal_zlib.error as e:
        raise InflateError(f"bad deflate stream: {e}") from None
    return out


def _zstd_frame_length(data: memoryview) -> int:
    """Compressed length of the zstd frame (or skippable frame) at the start of ``data``.

    python-zstandard does not expose ZSTD_findFrameCompressedSize, and its readers buffer input, so we
    walk the block headers (RFC 8878 section 3.1) to learn where the next frame starts.
    """
    if len(data) < 8:
        raise InflateError("zstd frame truncated")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
        (size,) = struct.unpack_from("<I", data, 4)
        return 8 + size
    if magic != _ZSTD_MAGIC:
        raise InflateError("not a zstd frame")
    try:
        pos = zstandard.frame_header_size(bytes(data[:18]))
    except zstandard.ZstdError as e:
        raise InflateError(f"bad zstd frame header: {e}") from None
    checksum = bool(data[4] & 0x04)
    while True:
        if pos + 3 > len(data):
            raise InflateError("zstd frame truncated")
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise InflateError("zstd reserved block type")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if last:
            return pos + (4 if checksum else 0)


def inflate_zstd(data: bytes, cluster_size: int) -> bytes:
    # Like qemu's qcow2_zstd_decompress: the cluster may span several frames, and we stop as soon as
    # the output holds one cluster. Each read is capped at what is still missing (+1 to detect excess).
    view = memoryview(data)
    out = bytearray()
    pos = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    while len(out) < cluster_size:
        if pos >= len(view):
            raise InflateError(f"zstd data gives {len(out)} bytes, expected {cluster_size}")
        try:
            flen = _zstd_frame_length(view[pos:])
        except InflateError:
            if pos == 0:
                raise
            # What follows the last frame is sector padding or the next cluster: the data ended short.
            raise InflateError(f"zstd data gives {len(out)} bytes, expected {cluster_size}") from None
        frame = view[pos:pos + flen]
        pos += flen  # > 0 always: the no-progress guard is structural
        if struct.unpack_from("<I", frame, 0)[0] & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            continue
        if len(frame) < flen:
            raise InflateError("zstd frame truncated")
        try:
            with dctx.stream_reader(frame, read_across_frames=False) as reader:
                want = cluster_size - len(out)
                while want >= 0:
                    chunk = reader.read(want + 1)
                    if not chunk:
                        break
                    out += chunk
                    want -= len(chunk)
        except zstandard.ZstdError as e:
            raise InflateError(f"bad zstd frame: {e}") from None
        if len(out) > cluster_size:
            raise InflateError(f"zstd data gives more than one cluster ({cluster_size} bytes)")
    return bytes(out)
