"""The carried pyfuse3 patch (patches/pyfuse3): which pyfuse3 runs is what the set-up says, and a
failure to build the patched one leaves stock pyfuse3 and a reason, never a failed set-up."""

from __future__ import annotations

import hashlib
import subprocess

import pyfuse3

from .conftest import REPO

PATCH = REPO / "patches" / "pyfuse3" / "lseek.patch"


def test_the_pyfuse3_installed_is_the_one_the_set_up_reports():
    status = (REPO / ".venv" / "pyfuse3-patch.status").read_text().strip()
    has_lseek = "lseek" in vars(pyfuse3.Operations)
    if status.startswith("patched "):
        assert has_lseek and status == "patched " + hashlib.sha256(PATCH.read_bytes()).hexdigest()
    else:
        assert status.startswith("stock: ") and len(status) > len("stock: ") and not has_lseek


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
