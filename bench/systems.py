"""The systems under test: the local file (physical limit), imgfs, s3fs-fuse
and rclone mount.  Each FUSE system runs in the foreground as a child we own
(stopped by PID with SIGTERM) against the same s3rver object.

Life-cycle verbs used by bench.py:
  cold()          stop daemon, empty its cache dir, drop page cache, start
  warm_restart()  stop daemon, drop page cache, start (cache kept)
  drop()          drop page cache only (daemon keeps running)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import procs
from procs import BenchError, clean_env, drop_caches, log, spawn

REPO = Path(__file__).resolve().parent.parent
IMGFS_BIN = REPO / ".venv" / "bin" / "imgfs"


@dataclass
class Ctx:
    run_dir: Path
    log_dir: Path
    endpoint: str
    bucket: str
    key: str
    size: int
    local_image: Path
    peer_read_ahead_kb: int = 16384
    imgfs_conf_extra: list[str] = field(default_factory=list)
    # the qemu-img row: a compressed qcow2 in the same bucket, and its local copy
    qcow2_key: str | None = None
    qcow2_local: Path | None = None
    qcow2_size: int = 0


class System:
    column = "?"          # table column
    variant = "main"      # "main" = the configuration used for all rows
    is_fuse = True

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.proc: subprocess.Popen | None = None
        self.hwm_kib = 0
        self.read_ahead_kb: int | None = None
        self.exit_codes: list[int | None] = []
        self.starts = 0
        self.start_s: list[float] = []

    @property
    def name(self) -> str:
        return self.column if self.variant == "main" else f"{self.column}-{self.variant}"

    # --- paths ---
    @property
    def base(self) -> Path:
        return self.ctx.run_dir / self.name

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def log_path(self) -> Path:
        return self.ctx.log_dir / f"{self.name}.log"

    def path(self) -> Path:
        raise NotImplementedError

    def path_of(self, key: str) -> Path | None:
        """Another object of the bucket through this system (None: it serves only the image)."""
        return self.mnt / key

    def describe(self) -> str:
        return (" ".join(self.argv()).replace(str(self.base), "$D")
                .replace(self.ctx.endpoint, "http://127.0.0.1:PORT"))

    # --- life cycle ---
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return os.path.exists(self.path())

    def setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        import time
        if procs.is_mounted(self.mnt):
            raise BenchError(f"{self.mnt} is already mounted")
        t0 = time.monotonic()
        self.proc = spawn(self.name, self.argv(), self.log_path, env=clean_env())
        procs.register_mount(self.mnt)

        def ok():
            try:
                return self.ready()
            except OSError:
                return False
        procs.wait_for(ok, 30, f"{self.name} mount", self.proc, self.log_path)
        self.start_s.append(time.monotonic() - t0)
        if not procs.is_mounted(self.mnt):
            raise BenchError(f"{self.name}: {self.path()} appeared but {self.mnt} is not a mount")
        st = os.stat(self.path())
        if st.st_size != self.ctx.size:
            raise BenchError(f"{self.name}: {self.path()} has size {st.st_size}, "
                             f"expected {self.ctx.size}")
        self.apply_read_ahead()
        self.starts += 1

    def apply_read_ahead(self) -> None:
        procs.set_read_ahead_kb(self.mnt, self.ctx.peer_read_ahead_kb)
        self.read_ahead_kb = procs.get_read_ahead_kb(self.mnt)

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the daemon and its descendants have used so far."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return procs.cpu_seconds(self.proc.pid)

    def sample_rss(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.hwm_kib = max(self.hwm_kib, procs.vm_hwm_kib(self.proc.pid))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.sample_rss()
        rc = procs.stop(self.proc, timeout=30)
        self.exit_codes.append(rc)
        self.proc = None
        procs.unmount(self.mnt)
        if procs.is_mounted(self.mnt):
            raise BenchError(f"{self.name}: {self.mnt} still mounted after stop")

    def wipe(self) -> None:
        if self.cache.exists():
            for p in self.cache.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def cold(self) -> None:
        self.stop()
        self.wipe()
        drop_caches()
        self.start()

    def warm_restart(self) -> None:
        self.stop()
        drop_caches()
        self.start()

    def drop(self) -> None:
        drop_caches()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def teardown(self, keep_cache: bool) -> None:
        self.stop()
        if not keep_cache:
            shutil.rmtree(self.base, ignore_errors=True)


class Local(System):
    """The physical limit: a local copy of the image on the same disk."""
    column = "local"
    is_fuse = False

    def path(self) -> Path:
        return self.ctx.local_image

    def path_of(self, key: str) -> Path | None:
        return self.ctx.qcow2_local if key == self.ctx.qcow2_key else None

    def describe(self) -> str:
        return f"dd of {self.ctx.local_image} (virtio disk; cold = drop_caches)"

    def start(self) -> None:
        self.read_ahead_kb = procs.get_read_ahead_kb(self.ctx.local_image)

    def stop(self) -> None:
        pass

    def wipe(self) -> None:
        pass

    def cold(self) -> None:
        drop_caches()

    warm_restart = cold

    def teardown(self, keep_cache: bool) -> None:
        pass


class Floor(System):
    """The floor: bench/floor_fs.py, a minimal pyfuse3 server (read = os.pread on the trio thread)
    serving the local copy of the image, with the same Python and pyfuse3 as imgfs. There is no
    backend and no cache of its own: "warm" is its source file with the page cache dropped."""
    column = "floor"

    def argv(self) -> list[str]:
        return [str(REPO / ".venv" / "bin" / "python"), str(Path(__file__).resolve().parent / "floor_fs.py"),
                str(self.ctx.local_image), str(self.mnt)]

    def describe(self) -> str:
        return "bench/floor_fs.py LOCAL_IMAGE MNT (pyfuse3, read = os.pread on the trio thread; same read_ahead_kb)"

    def path(self) -> Path:
        return self.mnt / "image"

    def path_of(self, key: str) -> Path | None:
        return None

    def wipe(self) -> None:
        pass


class Imgfs(System):
    column = "imgfs"

    @property
    def conf(self) -> Path:
        return self.base / "imgfs.conf"

    def setup(self) -> None:
        super().setup()
        if not IMGFS_BIN.exists():
            raise BenchError(f"{IMGFS_BIN} does not exist (imgfs not installed in the venv)")
        extra = "\n".join(self.ctx.imgfs_conf_extra)
        self.conf.write_text(f"""[DEFAULT]
enabled_backends = s3store:s3
[glance_store]
default_backend = s3store
[s3store]
s3_store_host = {self.ctx.endpoint}
s3_store_access_key = S3RVER
s3_store_secret_key = S3RVER
s3_store_bucket = {self.ctx.bucket}
s3_store_bucket_url_format = path
[imgfs]
cache_dir = {self.cache}
cache_max_size_gb = 4
{extra}
""")

    def argv(self) -> list[str]:
        return [str(IMGFS_BIN), "mount", str(self.mnt), "--config-file", str(self.conf)]

    def describe(self) -> str:
        extra = "; ".join(self.ctx.imgfs_conf_extra)
        return (f"imgfs mount MNT --config-file CONF  ([imgfs] cache_max_size_gb=4"
                f"{'; ' + extra if extra else ''}; read_ahead_kb set by imgfs)")

    def path(self) -> Path:
        return self.mnt / "images" / self.ctx.key

    def path_of(self, key: str) -> Path | None:
        return self.mnt / "images" / key

    def ready(self) -> bool:
        return self.ctx.key in os.listdir(self.mnt / "images")

    def apply_read_ahead(self) -> None:
        # imgfs sets its own read_ahead_kb, just after its mount first answers (its "mounted" log
        # line follows); we only record it, and the peers get the same
        import time
        deadline = time.monotonic() + 10
        def this_start() -> str:  # the log is appended to: what follows the last start's header
            return self.log_path.read_text(errors="replace").rsplit("\n==== ", 1)[-1]
        while " mounted " not in this_start() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.read_ahead_kb = procs.get_read_ahead_kb(self.mnt)


class S3fs(System):
    """s3fs-fuse 1.90.  Flags and why:
    ro                               read-only, like imgfs
    url=..., use_path_request_style  s3rver on loopback, path-style
    parallel_count=8,multipart_size=32
                                     on a read miss s3fs loads
                                     parallel_count*multipart_size bytes with
                                     parallel ranged GETs; best of a 4/8/16 x
                                     8/16/32 MB sweep on this machine
    max_stat_cache_size=100000,stat_cache_expire=3600
                                     no HEAD per open
    kernel_cache                     keep the page cache across opens
                                     (object is immutable), like imgfs
    use_cache=DIR,ensure_diskfree=1024
                                     'main' variant: local disk cache (warm)
    variant 'nocache': same without use_cache (tried for the cold rows)
    """
    column = "s3fs"

    def __init__(self, ctx: Ctx, variant: str = "main"):
        super().__init__(ctx)
        self.variant = variant

    @property
    def passwd(self) -> Path:
        return self.base / "passwd-s3fs"

    def setup(self) -> None:
        super().setup()
        self.passwd.write_text("S3RVER:S3RVER\n")
        self.passwd.chmod(0o600)

    def options(self) -> str:
        o = ["ro", f"url={self.ctx.endpoint}", "use_path_request_style",
             f"passwd_file={self.passwd}", "parallel_count=8", "multipart_size=32",
             "max_stat_cache_size=100000", "stat_cache_expire=3600", "kernel_cache",
             "dbglevel=warn"]
        if self.variant == "main":
            o += [f"use_cache={self.cache}", "ensure_diskfree=1024"]
        return ",".join(o)

    def argv(self) -> list[str]:
        return ["s3fs", self.ctx.bucket, str(self.mnt), "-f", "-o", self.options()]

    def path(self) -> Path:
        return self.mnt / self.ctx.key


class Rclone(System):
    """rclone v1.60 mount, s3 provider Other.  Flags and why:
    --read-only, --no-modtime            read-only, no extra HEADs
    --vfs-cache-mode full                'main': sparse on-disk cache (warm rows)
    --vfs-read-ahead 256M                read ahead into the cache (full mode)
    --vfs-read-chunk-size 128M --vfs-read-chunk-size-limit off
                                         large ranged GETs for sequential reads
    --buffer-size 64M                    in-memory read-ahead per open file
    --dir-cache-time 1h --attr-timeout 1h
                                         no metadata traffic during reads
    variant 'off': --vfs-cache-mode off --async-read=false (streaming; tried
      for the cold rows; with the default --async-read=true and a large
      read_ahead_kb rclone sees out-of-order reads, re-opens its stream and
      fetched 8x the image at ~30 MB/s here)
    """
    column = "rclone"

    def __init__(self, ctx: Ctx, variant: str = "main"):
        super().__init__(ctx)
        self.variant = variant

    @property
    def conf(self) -> Path:
        return self.base / "rclone.conf"

    def setup(self) -> None:
        super().setup()
        self.conf.write_text(f"""[s3b]
type = s3
provider = Other
env_auth = false
access_key_id = S3RVER
secret_access_key = S3RVER
endpoint = {self.ctx.endpoint}
region = us-east-1
force_path_style = true
""")

    def flags(self) -> list[str]:
        f = ["--read-only", "--no-modtime", "--vfs-read-chunk-size", "128M",
             "--vfs-read-chunk-size-limit", "off", "--buffer-size", "64M",
             "--dir-cache-time", "1h", "--attr-timeout", "1h"]
        if self.variant == "main":
            f += ["--vfs-cache-mode", "full", "--vfs-read-ahead", "256M",
                  "--vfs-cache-max-size", "4G"]
        else:
            f += ["--vfs-cache-mode", "off", "--async-read=false"]
        return f

    def argv(self) -> list[str]:
        return (["rclone", "mount", f"s3b:{self.ctx.bucket}", str(self.mnt), "--config",
                 str(self.conf), "--cache-dir", str(self.cache), "--log-level", "NOTICE"]
                + self.flags())

    def describe(self) -> str:
        return "rclone mount s3b:glance $D/mnt (provider Other, path style) " + " ".join(self.flags())

    def path(self) -> Path:
        return self.mnt / self.ctx.key


