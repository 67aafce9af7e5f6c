"""The Debian package as an operator meets it: built by ./.ci/package (offline from its wheelhouse),
installed with apt-get on a Debian 12 node with a real systemd 252 (a private copy of the nspawn root,
tests/nspawnkit.py), run from the package (check-config, the demo, the units), upgraded to a newer
version while a reader reads through the mount (the postinst's try-restart is a hand-over: the reader
sees every byte and no error), removed (no mount, no daemon, no venv) and purged (no file of the
package, its configuration, cache or run directories left)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .nspawnkit import HANDOVER_READER, MiB, Container, ContainerError, fd_store_size, fresh_root, paced_reader

pytestmark = pytest.mark.mount

NODE_CONF = """\
[DEFAULT]
enabled_backends = f:file

[f]
filesystem_store_datadir = /srv/images

[imgfs]
chunk_size_mb = 1
"""
APT = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "--no-install-recommends")
# What apt, dpkg, systemd and our own test files leave on any node: not the package's.
NOISE = ("var/lib/dpkg/", "var/lib/apt/", "var/cache/apt/", "var/cache/debconf/", "var/cache/ldconfig/",
         "var/log/", "var/lib/systemd/", "var/tmp/", "srv/", "etc/ld.so.cache", "etc/machine-id",
         "var/lib/dbus/", "etc/.pwd.lock", "root/")


@pytest.fixture(scope="module")
def newer(deb, tmp_path_factory) -> Path:
    """The same package with its version bumped: what an upgrade installs."""
    work = tmp_path_factory.mktemp("newer")
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    version = re.search(r"^Version: (\S+)$", control.read_text(), re.M)[1]
    control.write_text(control.read_text().replace(f"Version: {version}", f"Version: {version}+1"))
    out = work / deb.name.replace(f"_{version}_", f"_{version}+1_")
    subprocess.run(["dpkg-deb", "-Zgzip", "-z1", "-b", str(tree), str(out)], check=True, capture_output=True)
    return out


def tree(root: Path) -> set[str]:
    """Every path under the node's root, relative to it."""
    found = set()
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for name in dirs + files:
            found.add(os.path.normpath(os.path.join(rel, name)))
    return found


def in_root(root: Path, path: str) -> str:
    """``path`` as the root's own tree names it: through merged /usr's links (lib -> usr/lib)."""
    parent = os.path.relpath(os.path.realpath(root / os.path.dirname(path)), root)
    return os.path.normpath(os.path.join(parent, os.path.basename(path)))


@pytest.fixture(scope="module")
def node(deb, newer, tmp_path_factory):
    """A Debian 12 node of its own, booted, with both packages copied in and a snapshot of its files."""
    work = tmp_path_factory.mktemp("node")
    root = work / "root"
    try:
        fresh_root(root)
    except ContainerError as e:
        pytest.fail(str(e))
    for d in (deb, newer):
        shutil.copy(d, root / "var/tmp" / d.name)
    c = Container(root, work / "console.log")
    before = tree(root)  # once booted: the binds' mount points are the container's, not the package's
    c.root, c.before, c.deb, c.newer = root, before, f"/var/tmp/{deb.name}", f"/var/tmp/{newer.name}"  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def version(c: Container) -> str:
    return c.run("dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", "imgfs", check=False).stdout.strip()


def test_apt_installs_the_package_with_its_conffile_units_and_directories(node):
    c = node
    c.run(*APT, "install", c.deb, timeout=300)
    assert version(c).endswith("ii")
    assert c.run("imgfs", "--version").stdout.strip() == f"imgfs {Path(c.deb).name.split('_')[1]}"
    assert c.run("readlink", "-f", "/usr/sbin/mount.imgfs").stdout.strip() == "/opt/venvs/imgfs/bin/mount.imgfs"
    # the venv is the package's: Debian's python3, no pip to change it; Ceph's bindings would come from Debian
    assert c.run("readlink", "-f", "/opt/venvs/imgfs/bin/python3").stdout.strip() == "/usr/bin/python3.11"
    assert c.run("test", "-e", "/opt/venvs/imgfs/bin/pip", check=False).returncode != 0
    assert "include-system-site-packages = true" in c.run("cat", "/opt/venvs/imgfs/pyvenv.cfg").stdout
    # the hand-over needs the patched pyfuse3: the package carries it
    c.run("/opt/venvs/imgfs/bin/python3", "-c", "import pyfuse3; pyfuse3.replay_init; pyfuse3.Operations.lseek")
    conffiles = c.run("cat", "/var/lib/dpkg/info/imgfs.conffiles").stdout.split()
    assert conffiles == ["/etc/imgfs/imgfs.conf"]
    assert c.run("stat", "-c", "%a %U", "/etc/imgfs/imgfs.conf").stdout.split() == ["600", "root"]
    for d in ("/var/cache/imgfs", "/var/lib/imgfs", "/run/imgfs"):
        assert c.run("test", "-d", d, check=False).returncode == 0, d
    # neither enabled nor started: the shipped configuration names no store yet
    assert c.run("systemctl", "is-enabled", "imgfs.service", check=False).stdout.strip() == "disabled"
    assert c.run("systemctl", "is-active", "imgfs.service", check=False).stdout.strip() == "inactive"


def test_the_shipped_config_says_what_is_missing_and_an_edited_one_checks(node):
    c = node
    shipped = c.run("imgfs", "check-config", "--config-file", "/etc/imgfs/imgfs.conf", check=False)
    assert shipped.returncode != 0
    assert "no S3, file or cinder store configured" in shipped.stderr, shipped.stderr
    assert len(shipped.stderr.strip().splitlines()) == 1, shipped.stderr
    # the operator edits the conffile, as on any node
    (c.root / "etc/imgfs/imgfs.conf").write_text(NODE_CONF)  # type: ignore[attr-defined]
    checked = c.run("imgfs", "check-config", "--config-file", "/etc/imgfs/imgfs.conf")
    assert "store f: type=file datadir=/srv/images" in checked.stdout


def test_the_demo_runs_from_the_installed_package(node):
    """The package carries no mock S3 server: the demo serves its disk from a file store and still
    mounts, reads it back through the mount and checks its sha256."""
    out = node.run("imgfs", "demo", "--no-wait", "--workdir", "/var/tmp/demo", "--size-mib", "32", timeout=180).stdout
    assert "serving the disk from a file store" in out
    assert "MATCHES the source" in out and "README.txt" in out
    assert "stopped: imgfs unmounted" in out
    assert not node.mounted("/var/tmp/demo/mnt")


def test_systemd_analyze_verifies_the_installed_units(node):
    c = node
    ok = c.run("systemd-analyze", "verify", "imgfs.service", "imgfs@edge.service", check=False)
    assert ok.returncode == 0 and not ok.stderr.strip(), ok.stderr
    # nginx is only suggested: the mesh unit's one complaint here is its missing binary
    mesh = c.run("systemd-analyze", "verify", "imgfs-mesh.service", check=False)
    assert all("/usr/sbin/nginx is not executable" in line for line in mesh.stderr.strip().splitlines()), mesh.stderr
    unit = c.run("systemctl", "cat", "imgfs.service").stdout
    assert "ExecStart=/usr/bin/imgfs mount /var/lib/imgfs/mnt" in unit and "/usr/local" not in unit


def test_an_upgrade_hands_the_mount_over_and_its_reader_notices_nothing(node):
    c = node
    size = 512 * MiB
    h = hashlib.sha256()
    (c.root / "srv/images").mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
    with open(c.root / "srv/images/big", "wb") as f:  # type: ignore[attr-defined]
        for _ in range(size // (16 * MiB)):
            block = os.urandom(16 * MiB)
            h.update(block)
            f.write(block)
    (c.root / "var/tmp/reader.py").write_text(HANDOVER_READER)  # type: ignore[attr-defined]
    c.run("systemctl", "start", "imgfs.service", timeout=120)
    old_pid = c.run("systemctl", "show", "-p", "MainPID", "--value", "imgfs.service").stdout.strip()
    path = "/var/lib/imgfs/mnt/images/big"
    reader = paced_reader(c, path, 0.04)  # about 25 s for 512 MiB: the upgrade lands in the middle
    try:
        assert reader.stdout.readline().strip()  # the file is open: its inode
        time.sleep(2)
        upgrade = c.run(*APT, "install", c.newer, timeout=300)  # type: ignore[attr-defined]
        running_after_the_upgrade = reader.poll() is None
        out, err = reader.communicate(timeout=300)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, (out, err, upgrade.stdout[-2000:], c.journal())
    assert running_after_the_upgrade  # the restart happened under the reader, not after it
    assert out.split()[:2] == [str(size), h.hexdigest()], out
    assert version(c) == f"{Path(c.newer).name.split('_')[1]} ii"  # type: ignore[attr-defined]
    new_pid = c.run("systemctl", "show", "-p", "MainPID", "--value", "imgfs.service").stdout.strip()
    assert new_pid != old_pid
    log = c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
    assert "took over the mount at /var/lib/imgfs/mnt" in log, log[-3000:]
    assert fd_store_size(c, "imgfs.service") == 2  # the connection and the state, for the next one
    print(f"longest read across the upgrade: {out.split()[2]} s")


def test_remove_stops_and_leaves_no_mount_then_purge_leaves_no_file(node):
    c = node
    listed = [p.lstrip("/") for p in c.run("dpkg", "-L", "imgfs").stdout.split() if p != "/."]
    c.run(*APT, "remove", "imgfs", timeout=120)
    # (findmnt -t says 0 with no line when nothing matches: the kernel's table is the answer)
    assert " fuse.imgfs " not in c.run("cat", "/proc/self/mounts").stdout, "a mount is left"
    assert not c.run("pgrep", "-f", "imgfs mount", check=False).stdout.strip(), "a daemon is left"
    assert version(c) == f"{Path(c.newer).name.split('_')[1]} rc"  # type: ignore[attr-defined]
    for gone in ("/opt/venvs/imgfs", "/usr/bin/imgfs", "/usr/sbin/mount.imgfs", "/lib/systemd/system/imgfs.service"):
        assert c.run("test", "-e", gone, check=False).returncode != 0, gone
    assert c.run("test", "-f", "/etc/imgfs/imgfs.conf", check=False).returncode == 0  # remove keeps the conffile

    c.run(*APT, "purge", "imgfs", timeout=120)
    assert version(c) == ""  # dpkg knows the package no more
    for gone in ("/etc/imgfs", "/var/cache/imgfs", "/var/lib/imgfs", "/run/imgfs"):
        assert c.run("test", "-e", gone, check=False).returncode != 0, gone
    root = c.root  # type: ignore[attr-defined]
    left = [p for p in map(lambda p: in_root(root, p), listed)
            if p not in c.before and os.path.lexists(root / p)]  # type: ignore[attr-defined]
    assert not left, left
    new = sorted(p for p in tree(root) - c.before if not p.startswith(NOISE))  # type: ignore[attr-defined]
    assert not new, new
