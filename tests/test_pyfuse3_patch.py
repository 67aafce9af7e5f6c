"""The carried pyfuse3 patches (patches/pyfuse3): which pyfuse3 runs is what the set-up says, imgfs
takes the path that pyfuse3 allows, and a failure to build the patched one leaves stock pyfuse3 and a
reason, never a failed set-up."""

from __future__ import annotations

import hashlib
import subprocess

import pyfuse3

from imgfs import handover
from imgfs.fs import SEEKS_SERVED

from .conftest import REPO

PATCHES = [REPO / "patches" / "pyfuse3" / name for name in ("lseek.patch", "replay-init.patch")]


def test_the_pyfuse3_installed_is_the_one_the_set_up_reports():
    status = (REPO / ".venv" / "pyfuse3-patch.status").read_text().strip()
    has_lseek = "lseek" in vars(pyfuse3.Operations)
    has_replay = hasattr(pyfuse3, "replay_init")
    if status.startswith("patched "):
        both = b"".join(p.read_bytes() for p in PATCHES)
        assert has_lseek and has_replay and status == "patched " + hashlib.sha256(both).hexdigest()
    else:
        assert status.startswith("stock: ") and len(status) > len("stock: ") and not has_lseek and not has_replay
    # what imgfs does follows from it: holes served, restarts handed over (else remounted)
    assert SEEKS_SERVED == has_lseek and handover.REPLAY == has_replay


def test_the_set_up_falls_back_to_stock_pyfuse3_with_a_reason(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 1\n")  # a venv whose pyfuse3 cannot even be imported
    python.chmod(0o755)
    r = subprocess.run([str(REPO / "patches" / "pyfuse3" / "apply"), str(venv)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert (venv / "pyfuse3-patch.status").read_text().strip() == "stock: pyfuse3 is not installed"
    assert "stock pyfuse3 stays" in r.stderr
