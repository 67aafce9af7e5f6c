"""The README's first command runs `imgfs demo`: it must build, serve, mount, verify and clean up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import is_mounted


@pytest.mark.mount
def test_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "imgfs", "demo", "--no-wait", "--workdir", str(work), "--size-mib", "32"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the source" in result.stdout
    assert "starting a local S3 server (moto)" in result.stdout  # the S3 path: the test venv has the demo extra
    assert "README.txt" in result.stdout  # debugfs read the ext4 filesystem through the mount
    assert "stopped: imgfs unmounted" in result.stdout
    assert not is_mounted(work / "mnt")
    assert "imgfs-demo-secret" not in (work / "imgfs.log").read_text()
