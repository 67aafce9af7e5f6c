"""Response bodies received straight into the caller's buffer.

urllib3 2.x's ``HTTPResponse.readinto`` is ``read(len(b))`` followed by a copy: every 1 MiB piece of a
chunk becomes a fresh 1 MiB ``bytes`` whose pages the kernel faults in as ``recv`` writes them, then
is copied once more and freed. Measured in a 16-node fleet read through the mount (``perf record -a``),
the page faults under ``recv`` alone were 13% of imgfs's CPU. http.client's own ``readinto`` (the
response urllib3 wraps) receives into the buffer itself.

So a body is read through the wrapped response when urllib3 would not transform it (no
Content-Encoding to decode), inside urllib3's own error handling, so callers see the same errors
(``ReadTimeoutError``, ``ProtocolError``, ...) and the connection is released or dropped as urllib3
would. Both are urllib3 internals: when either is missing (another urllib3), or the body is encoded,
the public ``readinto`` is used; ``direct_path`` says which one a response gets, for a test to pin.
Knows nothing of stores or the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from urllib3.exceptions import IncompleteRead

_IDENTITY = ("", "identity")


def direct_path(r: Any) -> bool:
    """Whether ``readinto`` receives ``r``'s body in place (else through urllib3's copying one)."""
    return (getattr(r, "_fp", None) is not None and hasattr(r, "_error_catcher")
            and all(hasattr(r, a) for a in ("_fp_bytes_read", "length_remaining", "enforce_content_length"))
            and r.headers.get("Content-Encoding", "").strip().lower() in _IDENTITY)


def receiver(r: Any) -> Callable[[memoryview], int]:
    """``r``'s ``readinto``: the path is chosen once per response, not once per piece of its body."""
    return partial(_direct, r) if direct_path(r) else r.readinto


def readinto(r: Any, view: memoryview) -> int:
    """Up to ``len(view)`` bytes of ``r``'s body into ``view``; 0 at its end. Errors as urllib3 raises them."""
    return receiver(r)(view)


def _direct(r: Any, view: memoryview) -> int:
    with r._error_catcher():
        n = r._fp.readinto(view)
        if not n and len(view):
            # what urllib3's own read does at the end: a body shorter than its Content-Length is an
            # IncompleteRead (a ProtocolError to the caller), never a quiet end
            r._fp.close()
            if r.enforce_content_length and r.length_remaining:
                raise IncompleteRead(r._fp_bytes_read, r.length_remaining)  # -> ProtocolError
    # urllib3's tell() and its own Content-Length check (a later read) stay right
    r._fp_bytes_read += n
    if r.length_remaining is not None:
        r.length_remaining -= n
    return n
