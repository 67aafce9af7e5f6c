"""The OCI image: ./.ci/oci-image builds it from the Debian package (so from the same pinned
wheelhouse) without any registry, and podman runs it the way a Kolla-style role or a DaemonSet would:
privileged, /dev/fuse, the configuration and a file store bound in, the mount directory bound with
shared propagation. The mount reaches the host (the image's sha256 read there), and a stop unmounts."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, sha256_file, wait_for

pytestmark = pytest.mark.mount

CONF = "[DEFAULT]\nenabled_backends = f:file\n\n[f]\nfilesystem_store_datadir = /srv/images\n\n[imgfs]\nchunk_size_mb = 1\n"


@pytest.fixture(scope="module")
def image(deb) -> tuple[str, Path]:
    built = subprocess.run([str(REPO / ".ci/oci-image")], capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "IMGFS_DEB": str(deb)})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    last = built.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"imgfs oci-image: built (\S+_oci\.tar) \(\S+\); image (\S+) \(\w+\)", last)
    assert m, last
    print(last)
    return m[2], Path(m[1])


def test_the_archive_is_an_oci_image_whose_entrypoint_is_imgfs(image):
    name, archive = image
    listing = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    assert {"oci-layout", "index.json"} <= set(listing)
    config = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True, text=True,
                                       check=True).stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["/usr/bin/imgfs"]
    assert config["Cmd"][:2] == ["mount", "/var/lib/imgfs/mnt"]
    assert {"/var/lib/imgfs", "/var/cache/imgfs", "/etc/imgfs"} <= set(config["Volumes"])


def podman_runtime(image: str) -> tuple[list[str], list[str], str]:
    """podman's runtime and limit arguments that can run ``image`` here, or why none can.

    This VM mounts cgroup v1 controllers beside a v2 hierarchy (hybrid), which crun (podman's default
    on Debian 12) refuses; runc accepts it. The sandbox also lacks CAP_SYS_RESOURCE, so the container's
    limits must stay within the caller's (podman's defaults ask for more)."""
    if shutil.which("podman") is None:
        return [], [], "podman is not installed (./.ci/oci-image --tools installs it)"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = ["--ulimit", f"nofile={min(nofile, 65536)}:{min(nofile, 65536)}", "--ulimit", "nproc=4096:4096"]
    tried = []
    for runtime in ("crun", "runc"):
        args = ["--runtime", runtime]
        ok = subprocess.run(["podman", *args, "run", "--rm", "--network", "host", *limits, image, "--version"],
                            capture_output=True, text=True, timeout=120)
        if ok.returncode == 0:
            return args, limits, ""
        tried.append(f"{runtime}: {ok.stderr.strip().splitlines()[-1] if ok.stderr.strip() else ok.returncode}")
    return [], [], "podman cannot run a container on this machine: " + "; ".join(tried)


def test_podman_runs_it_privileged_and_its_mount_reaches_the_host(image, tmp_path):
    name, _ = image
    runtime, limits, why = podman_runtime(name)
    if not runtime:
        print(f"SKIPPED: {why}")
        pytest.skip(why)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/imgfs.conf").write_text(CONF)
    (tmp_path / "images").mkdir()
    (tmp_path / "images/img").write_bytes(os.urandom(5 * (1 << 20) + 7))
    (tmp_path / "cache").mkdir()
    lib = tmp_path / "lib"
    (lib / "mnt").mkdir(parents=True)
    # shared propagation needs a mount point of its own (a node's /var/lib/imgfs usually is under /)
    subprocess.run(["mount", "--bind", str(lib), str(lib)], check=True)
    subprocess.run(["mount", "--make-shared", str(lib)], check=True)
    ctr = f"imgfs-smoke-{os.getpid()}"
    try:
        started = subprocess.run(
            ["podman", *runtime, "run", "-d", "--name", ctr, *limits, "--privileged", "--network", "host",
             "--device", "/dev/fuse", "-v", f"{tmp_path}/etc:/etc/imgfs:ro", "-v", f"{tmp_path}/images:/srv/images:ro",
             "-v", f"{lib}:/var/lib/imgfs:rshared", "-v", f"{tmp_path}/cache:/var/cache/imgfs", name],
            capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        image_path = lib / "mnt/images/img"

        def up() -> bool:
            state = subprocess.run(["podman", "inspect", "-f", "{{.State.Status}}", ctr], capture_output=True, text=True)
            assert state.stdout.strip() in ("created", "running"), logs(ctr)
            return image_path.exists()

        wait_for(up, 60, "the container's mount on the host")
        # the venv sees Debian's Ceph bindings (the RBD path), its own packages first
        rbd = subprocess.run(["podman", *runtime, "exec", ctr, "/opt/venvs/imgfs/bin/python3", "-c",
                              "import rados, rbd, pyfuse3; print(rados.__file__, pyfuse3.__file__)"],
                             capture_output=True, text=True, timeout=60)
        assert rbd.returncode == 0, rbd.stderr
        assert rbd.stdout.split()[0].startswith("/usr/lib/python3/dist-packages/"), rbd.stdout
        assert rbd.stdout.split()[1].startswith("/opt/venvs/imgfs/"), rbd.stdout
        assert sha256_file(image_path) == sha256_file(tmp_path / "images/img")  # read on the host
        assert " fuse.imgfs " in Path("/proc/self/mounts").read_text()
        t = time.monotonic()
        subprocess.run(["podman", "stop", "-t", "30", ctr], check=True, capture_output=True, timeout=60)
        print(f"podman stop: {time.monotonic() - t:.2f} s")
        code = subprocess.run(["podman", "inspect", "-f", "{{.State.ExitCode}}", ctr], capture_output=True,
                              text=True).stdout.strip()
        assert code == "0", logs(ctr)
        assert "unmounted /var/lib/imgfs/mnt" in logs(ctr)
        assert not image_path.exists() and str(lib / "mnt") not in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["podman", "rm", "-f", ctr], capture_output=True)
        subprocess.run(["umount", "-l", str(lib)], capture_output=True)


def logs(ctr: str) -> str:
    got = subprocess.run(["podman", "logs", ctr], capture_output=True, text=True)  # (imgfs logs to stderr)
    return (got.stdout + got.stderr)[-3000:]
