"""qemu-img as the tests' oracle: its errors reach the test report, and its one flaky step is retried."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img")

# qemu calibrates LUKS key stretching by timing PBKDF2 against its own thread's CPU clock. On a loaded
# 2-core machine the thread can be charged 0 ms for the first probe, and qemu-img then gives up with
# this message (qemu crypto/pbkdf.c) before it writes anything. Nothing about the image is wrong, so
# that one message is retried; any other failure is reported at once.
_CALIBRATION_FLAKE = "Unable to get accurate CPU usage"
_LUKS_ATTEMPTS = 8


class QemuImgFailed(AssertionError):
    pass


def qemu_img(*args: str, timeout: float = 120) -> str:
    """Run qemu-img; its stdout, or QemuImgFailed carrying its stderr."""
    assert QEMU_IMG is not None, "needs qemu-img (apt-get install qemu-utils)"
    done = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise QemuImgFailed(f"qemu-img {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def luks_qcow2(path: Path, size: str) -> Path:
    """A LUKS-encrypted qcow2 made by qemu-img itself (passphrase 'imgfs-test')."""
    for attempt in range(1, _LUKS_ATTEMPTS + 1):
        try:
            qemu_img("create", "-f", "qcow2", "--object", "secret,id=s0,data=imgfs-test",
                     "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(path), size)
            return path
        except QemuImgFailed as e:
            if _CALIBRATION_FLAKE not in str(e) or attempt == _LUKS_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")
