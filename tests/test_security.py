"""The security promises, checked on real mounts: no secret (S3 keys, Cinder/Keystone password, RBD
keyring, Keystone tokens) ever leaves the daemon -- not in its DEBUG log, xattrs, `imgfs status`,
metrics, `check-config` output or the errors readers and CLI users get; the mount is read-only for
everyone and shared with other users only when configured; the control socket is root-only.

The leak tests collect everything a user or operator can see and grep all of it, and they first assert
that what they collected says something (DEBUG fetch lines, the 403s, the attachment), so an empty
capture cannot pass."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import boto3
import pytest

from imgfs.config import load as load_config

from .conftest import (ACCESS_KEY, SECRET_KEY, drop_page_cache, free_port, is_mounted, sha256, sha256_file,
                       start_moto, start_mount, wait_for, write_cinder_config, write_config)

pytestmark = pytest.mark.mount
MiB = 1 << 20
IMAGE = "5ec0e1d2-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
UNKNOWN = "0badc0de-0000-4000-8000-000000000000"
WRONG_SECRET = "imgfs-wrong-secret-Hv7kQ2mN8pZx/+"  # '/+': its URL-encoded forms differ from it
DEAD_ACCESS, DEAD_SECRET = "AKIAIMGFSDEADSTORE01", "imgfs-dead-secret-Lp3Wq9Zr"
WRONG_PASSWORD = "imgfs-wrong-password-Tn4Rf8Yc"
NOBODY = 65534

# Text that only a signed request carries: a log of request headers or a signed URL shows one of them
# even if the keys themselves were masked.
SIGNING_MARKERS = ("Authorization", "Signature=", "Credential=", "X-Amz-Signature", "X-Amz-Credential",
                   "X-Amz-Security-Token", "AWS4-HMAC-SHA256", "StringToSign", "CanonicalRequest")
TOKEN_MARKERS = ("X-Auth-Token", "X-Subject-Token")
FERNET_PREFIX = "gAAAAA"  # every Keystone fernet token starts so (version byte 0x80 + timestamp, base64)


# ---- what a user or operator can see ------------------------------------------------------------------

def run_imgfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgfs", *args], capture_output=True, text=True, timeout=120)


def shown(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def xattr_dump(mount: Path) -> str:
    """Every xattr of every file in the mount, one 'path name=value' line each."""
    lines = []
    for directory in [mount / "images", *sorted((mount / "stores").iterdir())]:
        for path in sorted(directory.iterdir()):
            for name in os.listxattr(path):
                lines.append(f"{path} {name}={os.getxattr(path, name).decode(errors='replace')}")
    return "\n".join(lines)


def control_outputs(sock: Path, port: int) -> dict[str, str]:
    """status (table and JSON), metrics over the socket and over the port; each must have answered."""
    outputs = {}
    for args in (["status"], ["status", "--json"], ["metrics"]):
        result = run_imgfs(*args, "--socket", str(sock))
        assert result.returncode == 0, result
        outputs["imgfs " + " ".join(args)] = shown(result)
    outputs["metrics port"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return outputs


# ---- the grep -------------------------------------------------------------------------------------------

def leaks(captured: dict[str, str], secrets: dict[str, str], markers: tuple[str, ...] = ()) -> list[str]:
    """Each secret (as is or URL-encoded) and each marker (any case) found, with where and around what;
    the secret itself is shown as <its label>."""
    found = []
    for where, text in captured.items():
        for label, secret in secrets.items():
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                at = text.find(form)
                if at >= 0:
                    context = text[max(0, at - 80): at + len(form) + 40].replace(form, f"<{label}>")
                    found.append(f"{label} in {where}: ...{context}...")
        for marker in markers:
            at = text.lower().find(marker.lower())
            if at >= 0:
                found.append(f"{marker!r} in {where}: ...{text[max(0, at - 80): at + 120]}...")
    return found


def assert_no_leaks(captured: dict[str, str], secrets: dict[str, str], markers: tuple[str, ...] = ()) -> None:
    assert all(len(s) >= 6 for s in secrets.values()), "a short needle would match by chance"
    found = leaks(captured, secrets, markers)
    assert not found, "secrets leaked:\n" + "\n".join(found)


def test_the_grep_finds_every_form_of_a_secret():
    """The leak tests can only fail if the grep can: a raw, a URL-encoded secret and a marker are found."""
    secret = "s3cr/et+key=="
    for text in (f"x {secret} y", f"?k={quote(secret, safe='')}", f"k={quote_plus(secret)}", "authorization: AWS4"):
        assert leaks({"log": text}, {"key": secret}, SIGNING_MARKERS), text
    assert leaks({"log": "nothing to see"}, {"key": secret}, SIGNING_MARKERS) == []


# ---- config helpers -----------------------------------------------------------------------------------

def add_stores(config: Path, stores: dict[str, tuple[str, dict[str, object]]]) -> Path:
    """Declare more stores ({name: (type, options)}) in a config written by conftest's writers."""
    text = config.read_text()
    extra = "".join(f", {name}:{kind}" for name, (kind, _) in stores.items())
    text = re.sub(r"^(enabled_backends = .*)$", lambda m: m.group(1) + extra, text, count=1, flags=re.MULTILINE)
    for name, (_, options) in stores.items():
        text += f"\n[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items())
    config.write_text(text)
    return config


def s3_store(url: str, access: str, secret: str) -> tuple[str, dict[str, object]]:
    return "s3", {"s3_store_host": url, "s3_store_access_key": access, "s3_store_secret_key": secret,
                  "s3_store_bucket": "glance", "s3_store_bucket_url_format": "path"}


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: the port was free a moment ago


# ---- S3 --------------------------------------------------------------------------------------------------

@pytest.fixture
def iam_moto(tmp_path):
    """A moto that enforces IAM, so refusals are real 403s: its first 6 requests (unauthenticated) create
    an 'owner' (s3:*) and a 'lister' (may list, not read); the owner then uploads the image."""
    url, proc = start_moto(tmp_path / "moto-iam.log", INITIAL_NO_AUTH_ACTION_COUNT="6")
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        keys = {}
        # AWS checks a listing against s3:ListBucket; moto from 5.2.6 checks it against the operation's
        # name instead. The lister gets both spellings of "may list", and nothing that reads.
        listing = ["s3:ListBucket", "s3:ListObjectsV2", "s3:ListObjects"]
        for user, actions in (("owner", ["s3:*"]), ("lister", listing)):
            iam.create_user(UserName=user)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="imgfs", PolicyDocument=json.dumps(policy))
        owner = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                             aws_access_key_id=keys["owner"]["AccessKeyId"],
                             aws_secret_access_key=keys["owner"]["SecretAccessKey"])
        data = os.urandom(3 * MiB + 777)
        owner.create_bucket(Bucket="glance")
        owner.put_object(Bucket="glance", Key=IMAGE, Body=data)
        yield url, {u: (k["AccessKeyId"], k["SecretAccessKey"]) for u, k in keys.items()}, data
    finally:
        proc.terminate()
        proc.wait(10)


def test_s3_secrets_never_leave_the_daemon(tmp_path, iam_moto, mounter):
    """One daemon at DEBUG with five S3 stores: good keys, keys that may list but not read, a wrong
    secret, an unknown access key, an unreachable endpoint. Cold and warm reads, a refused read, an
    unknown image, warm/evict, status, metrics, xattrs, check-config --probe: none shows a key."""
    url, keys, data = iam_moto
    (owner_access, owner_secret), (lister_access, lister_secret) = keys["owner"], keys["lister"]
    sock, port = tmp_path / "run" / "ctl.sock", free_port()
    config = write_config(tmp_path / "imgfs.conf", s3_url=url, bucket="glance", cache_dir=tmp_path / "cache",
                          access=owner_access, secret=owner_secret, memory_cache_mb=0, control_socket=sock,
                          metrics_port=port, s3_connect_timeout=1, s3_max_attempts=2)
    add_stores(config, {"lister": s3_store(url, lister_access, lister_secret),
                        "badsecret": s3_store(url, owner_access, WRONG_SECRET),
                        "badkey": s3_store(url, ACCESS_KEY, SECRET_KEY),
                        "dead": s3_store(closed_port_url(), DEAD_ACCESS, DEAD_SECRET)})
    secrets = {"owner access key": owner_access, "owner secret key": owner_secret,
               "lister access key": lister_access, "lister secret key": lister_secret,
               "wrong secret key": WRONG_SECRET, "unknown access key": ACCESS_KEY, "its secret key": SECRET_KEY,
               "dead store access key": DEAD_ACCESS, "dead store secret key": DEAD_SECRET}

    m = mounter(config, "--debug")
    wait_for(sock.exists, 10, "the control socket")
    captured = {"xattrs before reading": xattr_dump(m.path)}
    path = m.images / IMAGE
    assert sha256_file(path) == sha256(data)  # cold: from the store
    wait_for(lambda: os.getxattr(path, "user.imgfs.cached_fraction") == b"1.0000", 10, "the cache to fill")
    drop_page_cache(path)
    assert sha256_file(path) == sha256(data)  # warm: from the chunk cache
    with pytest.raises(PermissionError) as refused:  # listed, but GetObject is denied: a 403 mid-read
        sha256_file(m.path / "stores" / "lister" / IMAGE)
    with pytest.raises(FileNotFoundError) as unknown:  # asks every store, four of which fail
        (m.images / UNKNOWN).stat()
    captured["what readers saw"] = f"{refused.value}\n{unknown.value}"
    warm = run_imgfs("warm", IMAGE, "--socket", str(sock))
    warm_unknown = run_imgfs("warm", UNKNOWN, "--socket", str(sock))
    evict = run_imgfs("evict", IMAGE, "--socket", str(sock))
    assert warm.returncode == 0 and evict.returncode == 0 and warm_unknown.returncode == 1
    captured |= {"imgfs warm": shown(warm), "imgfs warm (unknown image)": shown(warm_unknown),
                 "imgfs evict": shown(evict)}
    captured |= control_outputs(sock, port)
    captured["xattrs after reading"] = xattr_dump(m.path)
    assert m.stop() == 0
    captured["daemon log"] = m.log()
    probe = run_imgfs("check-config", "--probe", "--debug", "--config-file", str(config))
    captured["check-config --probe"] = shown(probe)
    captured["repr(config)"] = repr(load_config([str(config)]))

    # What was captured says something, so the grep below cannot pass on empty text.
    log = captured["daemon log"]
    assert "DEBUG imgfs.reader: fetched " in log
    assert f"store 'lister' ({url}, bucket 'glance'): access denied while reading image {IMAGE}" in log
    assert "(HTTP 403 AccessDenied)" in log
    for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId"):
        assert f"access denied while listing the bucket (HTTP 403 {code})" in log, code
    assert "store 'dead'" in log and "cannot connect" in log
    assert refused.value.errno == errno.EACCES
    assert "warmed 3 MiB from s3store" in warm.stdout and "no such image" in warm_unknown.stderr
    status = json.loads(captured["imgfs status --json"])
    assert {s["name"]: s["reachable"] for s in status["stores"]} == {
        "s3store": True, "lister": True, "badsecret": False, "badkey": False, "dead": False}
    assert status["fetched_bytes"] == len(data)  # the second read and imgfs warm came from the cache
    assert 'imgfs_errors_total{errno="EACCES",kind="BackendAccessDenied"}' in captured["metrics port"]
    assert 'imgfs_store_reachable{store="badkey"} 0.0' in captured["imgfs metrics"]
    assert f"user.imgfs.version={hashlib.md5(data).hexdigest()}" in captured["xattrs after reading"]  # the ETag
    for view in ("images", "stores/s3store", "stores/lister"):
        assert f"{m.path}/{view}/{IMAGE} user.imgfs.store=" in captured["xattrs after reading"], view
    assert probe.returncode == 1 and probe.stdout.count("FAILED") == 3
    assert "s3store" in captured["repr(config)"]

    assert_no_leaks(captured, secrets, SIGNING_MARKERS)


# ---- Cinder (the lab) ----------------------------------------------------------------------------------

def files_holding(directory: Path, secret: str) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]


@pytest.mark.lab
def test_cinder_secrets_never_leave_the_daemon(tmp_path, lab, cinder, image_volume, mounter):
    """At DEBUG, through an attach (whose connection_info is logged, masked), while attached (status,
    metrics, xattrs), and with a second store Keystone refuses: no password, keyring key or token. The
    keyring os-brick writes to disk while attached is root-only and gone after the stop."""
    # Multiattach and a 60 s grace: the volume stays attached through every check below (a volume that
    # is not multiattach is let go a second after its last fetch, before the checks could see it).
    vol = image_volume(2 * MiB + 99, multiattach=True)
    host = f"imgfs-test-{uuid.uuid4().hex[:8]}"
    sock, port = tmp_path / "run" / "ctl.sock", free_port()
    config = write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host,
                                 control_socket=sock, metrics_port=port, attach_idle_timeout=60)
    # An unknown user, not a wrong password for a real one: a lockout must not hit the lab's 'imgfs'.
    add_stores(config, {"badcinder": ("cinder", {
        "cinder_store_auth_address": lab["keystone"]["auth_url"],
        "cinder_store_user_name": f"imgfs-no-such-user-{uuid.uuid4().hex[:8]}",
        "cinder_store_password": WRONG_PASSWORD,
        "cinder_store_project_name": lab["keystone"]["users"]["imgfs"]["project_name"],
        "cinder_os_region_name": lab["keystone"]["region_name"]})})
    keyring = Path(lab["ceph"]["client_cinder_keyring"]).read_text()
    keyring_keys = re.findall(r"^\s*key\s*=\s*(\S+)", keyring, re.MULTILINE)
    assert len(keyring_keys) == 1
    token = cinder.client.get_token()
    assert token.startswith(FERNET_PREFIX)  # so the prefix below finds any token of this Keystone
    secrets = {"imgfs's Keystone password": lab["keystone"]["users"]["imgfs"]["password"],
               "the wrong password": WRONG_PASSWORD, "the RBD keyring key": keyring_keys[0],
               "a Keystone token": FERNET_PREFIX}
    # os-brick writes the keyring into a ceph.conf while a volume is attached: imgfs points it at a
    # root-only directory of its own, emptied at every start (a SIGKILL leaves the file behind).
    daemon_tmp = tmp_path / "cache" / "private-tmp"

    m = mounter(config, "--debug")
    wait_for(sock.exists, 10, "the control socket")
    path = m.images / vol.image_id
    assert sha256_file(path) == sha256(vol.data)  # attaches the volume
    with pytest.raises(FileNotFoundError) as unknown:
        (m.images / UNKNOWN).stat()
    captured = {"xattrs": xattr_dump(m.path), "what readers saw": str(unknown.value)}
    captured |= control_outputs(sock, port)  # while attached (attach_idle_timeout 60 s)
    on_disk = files_holding(daemon_tmp, keyring_keys[0])
    assert on_disk and all((p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) == (0, 0o600) for p in on_disk)
    assert stat.S_IMODE(daemon_tmp.stat().st_mode) == 0o700
    assert m.stop() == 0
    assert files_holding(daemon_tmp, keyring_keys[0]) == []
    shutil.rmtree(tmp_path / "cache" / "chunks")  # so the next read must attach again
    killed = mounter(config, name="killed")
    sha256_file(killed.images / vol.image_id)
    killed.stop(signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(killed.path)], check=True)
    assert files_holding(daemon_tmp, keyring_keys[0]), "the kill should have left os-brick's file"
    mounter(config, name="killed").stop()  # restarted on the same mount point: the same instance
    assert files_holding(daemon_tmp, keyring_keys[0]) == [], "a restart must sweep what a killed daemon left"
    captured["daemon log"] = m.log()
    probe = run_imgfs("check-config", "--probe", "--debug", "--config-file", str(config))
    captured["check-config --probe"] = shown(probe)

    log = captured["daemon log"]
    attachment_lines = [line for line in log.splitlines()
                        if "DEBUG imgfs.backends.cinder:" in line and f"of volume {vol.volume_id}: {{" in line]
    assert len(attachment_lines) == 1 and "'keyring': '***'" in attachment_lines[0], attachment_lines
    assert "attached volume" in log and "store 'badcinder'" in log and "authentication failed" in log
    status = json.loads(captured["imgfs status --json"])
    assert [(a["volume_id"], a["attached"]) for a in status["attachments"]] == [(vol.volume_id, True)]
    assert {s["name"]: s["reachable"] for s in status["stores"]} == {"cinderstore": True, "badcinder": False}
    assert "imgfs_attachments 1.0" in captured["metrics port"]
    assert f"user.imgfs.version={vol.volume_id}" in captured["xattrs"]
    assert probe.returncode == 1 and "FAILED" in probe.stdout

    assert_no_leaks(captured, secrets, TOKEN_MARKERS)


# ---- who may touch the mount -------------------------------------------------------------------------

@pytest.fixture
def public_dir():
    """A directory anyone may traverse. pytest's tmp dirs are 0700, so under them every 'nobody is
    refused' check would pass for the wrong reason."""
    path = Path(tempfile.mkdtemp(prefix="imgfs-security-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_mount(tmp_path, public_dir):
    """Start a file-store mount of one image at public_dir/mnt (config, cache and log stay private);
    stopped at teardown, which must be clean."""
    data = os.urandom(2 * MiB + 5)
    files = tmp_path / "files"
    files.mkdir()
    (files / IMAGE).write_bytes(data)
    started = []

    def start(**options):
        config = write_config(tmp_path / "imgfs.conf", s3_url=None, bucket=None, cache_dir=tmp_path / "cache",
                              file_dir=files, **options)
        m = start_mount(public_dir / "mnt", config, tmp_path / "mnt.log", tmp_path / "cache")
        started.append(m)
        return m, data

    yield start
    for m in started:
        assert m.stop() == 0, m.log()
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", str(m.path)], check=False)
            pytest.fail(f"{m.path} still mounted after imgfs stopped")


# What each operation on a path gives, as an errno name, "ok", or the sha256 of what a read returned.
# Run by Debian's python: the venv's lives under /root (0700), where nobody cannot reach it.
PROBE = r"""
import errno, hashlib, json, os, socket, sys
path = sys.argv[1]
directory = os.path.dirname(path)

def attempt(action):
    try:
        result = action()
    except OSError as e:
        return errno.errorcode[e.errno]
    return result if isinstance(result, str) else "ok"

def read():
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)

operations = {
    "stat": lambda: os.stat(path),
    "read": read,
    "connect": connect,
    "open for writing": lambda: os.close(os.open(path, os.O_WRONLY)),
    "open read-write": lambda: os.close(os.open(path, os.O_RDWR)),
    "truncate": lambda: os.truncate(path, 0),
    "create": lambda: os.close(os.open(os.path.join(directory, "new"), os.O_CREAT | os.O_WRONLY, 0o644)),
    "mkdir": lambda: os.mkdir(os.path.join(directory, "newdir")),
    "symlink": lambda: os.symlink("x", os.path.join(directory, "link")),
    "unlink": lambda: os.unlink(path),
    "rename": lambda: os.rename(path, path + ".renamed"),
    "chmod": lambda: os.chmod(path, 0o666),
    "chown": lambda: os.chown(path, os.getuid(), os.getgid()),
    "utime": lambda: os.utime(path),
    "setxattr": lambda: os.setxattr(path, "user.imgfs.size", b"1"),
    "removexattr": lambda: os.removexattr(path, "user.imgfs.size"),
}
print(json.dumps({name: attempt(operations[name]) for name in sys.argv[2:]}))
"""
WRITES = ("open for writing", "open read-write", "truncate", "create", "mkdir", "symlink", "unlink", "rename",
          "chmod", "chown", "utime", "setxattr", "removexattr")


def probe(path: Path, *operations: str, uid: int | None = None, groups: tuple[int, ...] = ()) -> dict[str, str]:
    """Each operation's outcome on ``path``, as root or as ``uid`` (with only ``groups`` besides its own)."""
    as_user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                      f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
    result = subprocess.run([*as_user, "/usr/bin/python3", "-c", PROBE, str(path), *operations], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mount_options(path: Path) -> tuple[set[str], set[str]]:
    """The mount's per-mount options and its superblock options, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return set(fields[5].split(",")), set(fields[fields.index("-") + 3].split(","))
    raise AssertionError(f"{path} is not mounted")


def test_without_allow_other_only_root_gets_in(public_mount):
    m, data = public_mount()
    path = m.images / IMAGE
    per_mount, superblock = mount_options(m.path)
    assert "ro" in per_mount and "allow_other" not in superblock
    assert probe(path, "read") == {"read": sha256(data)}
    assert probe(path, "stat", "read", uid=NOBODY) == {"stat": "EACCES", "read": "EACCES"}
    assert probe(m.path.parent, "stat", uid=NOBODY) == {"stat": "ok"}  # so the refusal is the mount's


def test_with_allow_other_everyone_reads_and_nobody_writes(public_mount):
    """docs/semantics.md promises EROFS for every kind of write, and the kernel gives it before any permission
    check on an ro mount: so for root and nobody alike."""
    m, data = public_mount(allow_other="true")
    path = m.images / IMAGE
    per_mount, superblock = mount_options(m.path)
    assert "ro" in per_mount and "allow_other" in superblock
    for uid in (None, NOBODY):
        got = probe(path, "stat", "read", *WRITES, uid=uid)
        who = "nobody" if uid else "root"
        assert got["stat"] == "ok" and got["read"] == sha256(data), (who, got)
        assert {op: got[op] for op in WRITES} == dict.fromkeys(WRITES, "EROFS"), who
    assert sorted(os.listdir(m.images)) == [IMAGE] and sha256_file(path) == sha256(data)


def test_with_mount_group_its_members_read_and_other_users_do_not(public_mount):
    """Least privilege for a hypervisor: the mount readable by one group (here 'users', gid 100, standing
    in for libvirt-qemu or cinder), not by every local user as with allow_other."""
    import grp

    gid = grp.getgrnam("users").gr_gid
    m, data = public_mount(mount_group="users")
    path = m.images / IMAGE
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o440)
    assert stat.S_IMODE(m.images.stat().st_mode) == 0o550
    member = probe(path, "stat", "read", *WRITES, uid=NOBODY, groups=(gid,))
    assert member["read"] == sha256(data) and {op: member[op] for op in WRITES} == dict.fromkeys(WRITES, "EROFS")
    assert probe(path, "stat", "read", uid=NOBODY) == {"stat": "EACCES", "read": "EACCES"}
    assert probe(path, "read") == {"read": sha256(data)}  # root still reads


def test_an_unknown_mount_group_is_one_line(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {tmp_path}\n"
                    f"[imgfs]\ncache_dir = {tmp_path}/cache\nmount_group = no-such-group-here\n")
    result = subprocess.run([sys.executable, "-m", "imgfs", "check-config", "--config-file", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "[imgfs] mount_group = 'no-such-group-here'" in result.stderr, result.stderr


# ---- the control socket --------------------------------------------------------------------------------

def test_control_socket_is_root_only(public_mount, public_dir):
    run = public_dir / "run"  # does not exist yet: imgfs creates it
    sock = run / "ctl.sock"
    public_mount(control_socket=sock)
    wait_for(sock.exists, 10, "the control socket")
    for what, path, mode in (("directory", run, 0o700), ("socket", sock, 0o600)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), what
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert run_imgfs("status", "--socket", str(sock)).returncode == 0  # root gets in

    # Open the directory up, so only the socket's own mode stands between nobody and the daemon; a
    # 0666 socket beside it shows that nobody could otherwise connect.
    run.chmod(0o755)
    with socket.socket(socket.AF_UNIX) as decoy:
        decoy.bind(str(run / "decoy.sock"))
        decoy.listen(1)
        os.chmod(run / "decoy.sock", 0o666)
        assert probe(run / "decoy.sock", "connect", uid=NOBODY) == {"connect": "ok"}
        assert probe(sock, "connect", uid=NOBODY) == {"connect": "EACCES"}
    os.unlink(run / "decoy.sock")
