"""The composition root: builds every part, mounts, runs them in one nursery, unmounts.

``serve()`` returns when the mount ends (SIGTERM/SIGINT, or ``shutdown`` set); every background task
(FUSE workers, chunk fetches, catalog refresh) is a child of its nursery, so nothing outlives it.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3
import trio

from . import backends as backend_factory
from . import buffers
from .attach import Attachments, decode_handed, encode_handed
from .backends.base import Backend
from .cache import ChunkCache
from .catalog import Catalog
from .config import Config, refuse_own_mount
from .errors import ConfigError, ImgfsError
from .fs import SEEKS_SERVED, Operations
from .handover import connection as fuse_connection
from .handover import fdstore, parting
from .handover.session import FUSE_FD, Session, close_session, hand_over_possible, open_session
from .model import Image
from .notify import notify
from .disks import DiskBook
from .reader import ChunkFetcher

if TYPE_CHECKING:
    from .endpoint import ImageApi
    from .fleet.node import FleetNode

log = logging.getLogger(__name__)

FIRST_LISTING_TIMEOUT = 20.0  # seconds to wait for the stores before mounting with what we have


class MountError(ImgfsError):
    """The mount itself failed (mountpoint missing, busy, no /dev/fuse...)."""


class UsageError(ConfigError):
    """Bad command-line input (exit code 2, like a config error)."""


@dataclass
class Daemon:
    """Every part of a running mount; what status, metrics and tests look at."""

    config: Config
    mountpoint: str
    backends: dict[str, Backend]
    cache: ChunkCache
    catalog: Catalog
    fetcher: ChunkFetcher
    ops: Operations
    attachments: dict[str, Attachments]
    image_api: "ImageApi | None" = None  # the node-local Image API endpoint, when [imgfs] image_api_listen is set
    cache_lock: int = -1  # the flock on cache_dir (claim_cache_dir), closed when the daemon ends
    fleet: "FleetNode | None" = None  # fleet mode ([fleet] enabled): the mesh and the origin gateway


def control_socket_path(config_path: str, mountpoint: str) -> str:
    """Where the control socket of the mount at ``mountpoint`` listens: one per mount."""
    return config_path or "/run/imgfs/" + (os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root") + ".sock"


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist; create it with: mkdir -p {path}") from None
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {path}: {os.strerror(e.errno or errno.EIO)}") from None
        # What a killed imgfs leaves when nobody kept its connection: nothing can be read there, so
        # clear it (as fusermount3 -u -z would) and mount again.
        try:
            fuse_connection.detach(path)
        except ImgfsError:
            raise UsageError(f"mountpoint {path} is a dead FUSE mount (a crashed daemon?); clear it with: "
                             f"fusermount3 -u {path}") from None
        log.warning("mountpoint %s was a dead FUSE mount (an imgfs that died); cleared it", path)
        return check_mountpoint(path)
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point; unmount it first or pick another directory")
    if os.listdir(path):
        raise UsageError(f"mountpoint {path} is not empty; imgfs mounts only on an empty directory")
    return path


def claim_cache_dir(cache_dir: str, mountpoint: str) -> int:
    """Hold ``cache_dir`` for this daemon alone (an flock the kernel drops when the process dies, however
    it dies), or a one-line ConfigError naming the mount that holds it. Two daemons on one cache would
    evict each other's chunks, and each start sweeps the directory's temporary files (os-brick's
    keyrings), which the other may be using. The descriptor is kept for the daemon's life."""
    path = os.path.join(cache_dir, "lock")
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        # Held read-only: a file open for writing would keep the cache's filesystem from being remounted
        # read-only, which imgfs must survive (it then serves from the stores).
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.EROFS:  # nothing can be cached or swept there: imgfs serves from the stores
            log.warning("[imgfs] cache_dir %s is on a read-only filesystem; not claiming it", cache_dir)
            return -1
        raise ConfigError(f"[imgfs] cache_dir {cache_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another imgfs"
        os.close(fd)
        raise ConfigError(f"[imgfs] cache_dir {cache_dir} is in use by the imgfs of {holder}; give each imgfs "
                          "instance a cache_dir of its own") from None
    try:  # who holds it, for the next one's message; written and closed at once
        with open(path, "w") as f:
            f.write(f"{mountpoint} (pid {os.getpid()})\n")
    except OSError:
        pass
    return fd


def build(config: Config, mountpoint: str) -> Daemon:
    options = config.options
    cache_lock = claim_cache_dir(options.cache_dir, mountpoint)
    backends: dict[str, Backend] = {}
    for store in config.stores:
        try:
            backends[store.name] = backend_factory.build(store, options, instance=mountpoint)
        except ValueError as e:  # e.g. boto3 rejecting an endpoint URL
            raise ConfigError(f"store '{store.name}': {e}") from None
    cache = ChunkCache(
        options.cache_dir,
        max_bytes=int(options.cache_max_size_gb * 2**30),
        max_count=options.cache_max_count,
        memory_bytes=options.memory_cache_mb * 2**20,
        direct_writes=options.cache_direct_writes,
    )
    source = None
    if config.glance is not None:
        from .glance import GlanceSource

        source = GlanceSource(config.glance, timeout=options.cinder_api_timeout)
    catalog = Catalog(
        list(backends.values()),
        refresh_interval=options.refresh_interval,
        negative_ttl=options.negative_lookup_ttl,
        limiter=trio.CapacityLimiter(4),
        source=source,
    )
    attach_limiter = trio.CapacityLimiter(4)
    attachments = {
        name: Attachments(
            backend,  # type: ignore[arg-type]
            idle_timeout=options.attach_idle_timeout,
            attach_timeout=options.attach_timeout,
            detach_deadline=options.detach_deadline,
            limiter=attach_limiter,
        )
        for name, backend in backends.items()
        if backend.kind == "cinder"
    }
    fleet = None
    fetch_backends = backends
    if config.fleet is not None:
        from .fleet.node import FleetNode

        fleet = FleetNode.build(config.fleet, backends, catalog, chunk_size=options.chunk_size,
                                connections=options.backend_max_connections)
        fetch_backends = fleet.fetch_backends
        if options.catalog != "glance":
            # the endpoint still checks full downloads against the digest Glance gives each caller
            log.warning("fleet: [imgfs] catalog = %s knows no image digests, so nothing checks the bytes peers "
                        "serve to the mount; set catalog = glance", options.catalog)
    fetcher = ChunkFetcher(
        cache, fetch_backends, chunk_size=options.chunk_size, max_connections=options.backend_max_connections,
        holders=dict(attachments),
        weights={store.name: store.weight for store in config.stores},
    )
    if fleet is not None:
        fetcher.second_chance = fleet.distrust
        fetcher.witness = fleet
    group = options.mount_group
    prefetch_max = options.prefetch_max_mb * 2**20
    # raw/: only Glance says what format an image is in (decoding on a guess is how a raw disk holding a
    # qcow2 header becomes a way to read other files)
    disks = DiskBook(catalog, fetcher, prefetch_max=prefetch_max, holes_served=SEEKS_SERVED) \
        if options.catalog == "glance" else None
    ops = Operations(catalog, fetcher, prefetch_max=prefetch_max, gid=max(group, 0), group_only=group >= 0,
                     disks=disks)

    async def forget_old_versions(image_id: str, old: Image | None, new: Image | None) -> None:
        # A new checksum in Glance means new bytes in every store, whatever the stores' versions say.
        # (updated_at alone changes on every property edit: the bytes of an active image cannot.)
        rewritten = old is not None and new is not None and old.get("checksum") != new.get("checksum")
        for loc in old.locations if old else ():
            current = new.at(loc.store) if new else None
            if current is None or current.version != loc.version or rewritten:
                keep = None if current is None or rewritten else current.version
                dropped = await cache.drop(loc.store, image_id, keep_version=keep)
                if dropped:
                    log.info("cache: dropped %d chunks of image %s (store '%s', version %s)", dropped, image_id, loc.store, loc.version)

    catalog.listeners.append(forget_old_versions)

    async def step_aside(image_id: str, old: Image | None, new: Image | None) -> None:
        # The image-volume is Glance's: once the catalog no longer shows the image on it (deleted, not
        # active, the volume deleting or migrating), imgfs lets go of it so Glance and Cinder can act.
        for loc in old.locations if old else ():
            holder = attachments.get(loc.store)
            current = new.at(loc.store) if new else None
            if holder is not None and (current is None or current.version != loc.version):
                holder.step_aside(loc, "the image left the catalog" if new is None else "the image moved off the volume")
        for loc in new.locations if new else ():
            holder = attachments.get(loc.store)
            if holder is not None:
                holder.welcome(loc)

    if attachments:
        catalog.listeners.append(step_aside)
    image_api = None
    if config.image_api is not None:
        from .endpoint import ImageApi  # imports h11 and httpx: only when the endpoint is on
        from .upstream import Upstream

        image_api = ImageApi(catalog, fetcher, Upstream(config.image_api), prefetch_max=options.prefetch_max_mb * 2**20)
    return Daemon(config, mountpoint, backends, cache, catalog, fetcher, ops, attachments, image_api, cache_lock, fleet)


def tame_malloc() -> None:
    """Keep chunk-sized buffers from bloating RSS. glibc raises its mmap threshold after the first
    large free, after which every 1-8 MiB chunk buffer lands on a heap that never shrinks, and each
    worker thread gets an arena of its own. A fixed 1 MiB threshold returns chunk buffers to the kernel
    on free; two arenas are plenty for threads that only move bytes."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _fuse_options(config: Config) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=imgfs", "subtype=imgfs", "ro"}
    # With mount_group the kernel lets other users in (allow_other) and then checks the modes imgfs
    # reports (default_permissions, always on): root:<group>, 0440 files and 0550 directories.
    if config.options.allow_other or config.options.mount_group >= 0:
        opts.add("allow_other")
    return opts


def _tune_kernel(mountpoint: str, read_ahead_kb: int) -> None:
    """Large kernel reads are what make a FUSE file fast: the kernel caps each READ by the mount's
    readahead (128 KiB by default), and lets only max_background of them run at once."""
    dev = os.stat(mountpoint).st_dev
    settings = []
    if read_ahead_kb:
        settings.append((f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", str(read_ahead_kb)))
    connection = f"/sys/fs/fuse/connections/{os.minor(dev)}"
    if os.path.isdir(connection):
        settings.append((f"{connection}/max_background", "64"))
        settings.append((f"{connection}/congestion_threshold", "48"))
    else:
        log.info("fusectl is not mounted, so the kernel's default of 12 parallel FUSE reads applies; "
                 "'mount -t fusectl none /sys/fs/fuse/connections' (systemd does it at boot) lets imgfs raise it")
    for path, value in settings:
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            log.warning("cannot set %s to %s (%s); sequential reads will be slower", path, value, os.strerror(e.errno or errno.EIO))


async def serve(
    config: Config,
    mountpoint: str,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> bool:
    """Mount and serve until a stop or a restart; whether the mount was handed over (left mounted for
    the next imgfs process)."""
    # What the last imgfs left in systemd's fd store: its mount is checked when it is taken over.
    handed = fdstore.inherited()
    mountpoint = os.path.abspath(mountpoint) if FUSE_FD in handed else check_mountpoint(mountpoint)
    config = refuse_own_mount(config, mountpoint)
    tame_malloc()
    daemon = build(config, mountpoint)
    notify("STATUS=opening the chunk cache")
    await daemon.cache.open()
    # Before a fresh mount, what an earlier imgfs left in Cinder is cleared first; a takeover does it
    # while serving (readers are waiting), and only an attach waits for it.
    taking_over = FUSE_FD in handed
    if taking_over:
        _adopt_attachments(daemon, parting.take(handed, ATTACHMENTS_FD))
    for attachments in daemon.attachments.values():
        attachments.hold_attaches()
        if not taking_over:
            notify(f"STATUS=removing stale attachments of store {attachments.ops.name}")
            await attachments.clear_stale()
    if not taking_over:
        await _warm_up(daemon)
    mounted = False
    session: Session | None = None
    hand_over = [False]  # set by SIGUSR2 (the unit's RestartKillSignal): leave the mount to the next imgfs
    try:
        async with trio.open_nursery() as nursery:
            daemon.fetcher.attach(nursery)
            nursery.start_soon(_trim_buffers)
            for attachments in daemon.attachments.values():
                attachments.start(nursery)
            daemon.fetcher.on_stale = lambda loc: nursery.start_soon(daemon.catalog.recheck, loc)
            # A hand-over leaves its last listing: the mount answers at once with what it showed, and
            # the first refresh (right away) brings it up to date.
            last = parting.take(handed, CATALOG_FD)
            restored = await daemon.catalog.restore(last) if last is not None else 0
            if restored:
                log.info("starting from the listing the last imgfs left (%d images); listing the stores again now",
                         restored)
            notify("STATUS=listing stores")
            listed = trio.Event()
            nursery.start_soon(daemon.catalog.run, listed)
            with trio.move_on_after(0 if restored else FIRST_LISTING_TIMEOUT) as waited:
                await listed.wait()
            if waited.cancelled_caught and not restored:
                log.warning("stores did not answer within %gs; mounting now, images appear as listings arrive", FIRST_LISTING_TIMEOUT)
            try:
                options = _fuse_options(config)
                session = open_session(daemon.ops, mountpoint, options, handed=handed, allow_other="allow_other" in options,
                                       check_mountpoint=check_mountpoint)
            except RuntimeError as e:
                raise MountError(f"cannot mount {mountpoint}: {e}; is fuse3 installed and /dev/fuse present?") from None
            except fuse_connection.FuseConnectionError as e:
                raise MountError(str(e)) from None
            mounted = True
            nursery.start_soon(_fuse_main, nursery.cancel_scope)
            if handle_signals:
                nursery.start_soon(_stop_on_signal, daemon.ops)
                nursery.start_soon(_hand_over_on_signal, daemon, session, hand_over)
                nursery.start_soon(_explain_hangup)
            # Ready means the mount answers: ask it from a thread (this loop is the one serving it). The
            # kernel readahead can only be raised after the INIT exchange (its reply caps it), and a file
            # keeps what it was opened with: opens wait until it is done.
            tuned = daemon.ops.opens_wait_for = trio.Event()
            try:
                await trio.to_thread.run_sync(os.stat, os.path.join(mountpoint, "images"))
                await trio.to_thread.run_sync(_tune_kernel, mountpoint, config.options.read_ahead_kb)
            finally:
                tuned.set()
            count = len(daemon.catalog.image_ids())
            stores = ", ".join(f"{b.name} ({b.kind})" for b in daemon.backends.values())
            log.info("mounted %s: %d images from %s", mountpoint, count, stores)
            notify("READY=1", f"STATUS=serving {count} images at {mountpoint}")
            # What is alive now (the libraries' modules, botocore's service models, the catalog) lives as
            # long as the process: out of the collector's generations, a full collection no longer walks
            # it each time the reads' short-lived objects trigger one.
            gc.freeze()
            watchdog = _watchdog_interval()
            if watchdog:
                nursery.start_soon(_watchdog, mountpoint, watchdog)
            from . import control

            socket_path = control_socket_path(config.options.control_socket, mountpoint)
            try:
                await nursery.start(control.serve_socket, daemon, socket_path)
            except OSError as e:
                log.error("cannot listen on the control socket %s (%s); imgfs status/warm/evict will not reach this mount",
                          socket_path, e.strerror or os.strerror(e.errno or errno.EIO))
            if config.options.metrics_port:
                try:
                    await nursery.start(control.serve_metrics, daemon, config.options.metrics_port)
                except OSError as e:
                    log.error("cannot serve metrics on 127.0.0.1:%d (%s); change [imgfs] metrics_port",
                              config.options.metrics_port, os.strerror(e.errno or errno.EIO))
            if daemon.image_api is not None:
                await _start_image_api(daemon, nursery, handed, session)
            for name, fd in handed.items():  # nothing of ours: a fd store entry of an older imgfs
                os.close(fd)
                fdstore.remove(name)
            if daemon.fleet is not None:
                try:
                    await nursery.start(daemon.fleet.serve)
                    log.info("fleet: reading chunks through the mesh at 127.0.0.1:%d (%d members); origin gateway on "
                             "127.0.0.1:%d", daemon.fleet.config.local_port, len(daemon.fleet.config.members),
                             daemon.fleet.config.gateway_port)
                except OSError as e:
                    log.error("fleet: cannot serve the origin gateway on 127.0.0.1:%d (%s); peers will get this node's "
                              "chunks from other owners", daemon.fleet.config.gateway_port, os.strerror(e.errno or errno.EIO))
            if taking_over:
                # Now that the mount and the endpoint answer (their start is what readers waited for),
                # what a fresh start does before mounting: client set-up, os-brick, stale attachments.
                nursery.start_soon(_warm_up, daemon)
                for attachments in daemon.attachments.values():
                    nursery.start_soon(attachments.clear_stale)
            task_status.started(daemon)
    finally:
        if mounted and session is not None:
            notify("STOPPING=1")
            if not hand_over[0]:
                fdstore.remove(IMAGE_API_FD)
            close_session(session, hand_over=hand_over[0])
            log.info("left the mount at %s to the next imgfs" if hand_over[0] else "unmounted %s", mountpoint)
        # No reader is left once the mount is gone: give every volume back to Cinder, or, when the next
        # imgfs takes the mount over, leave it the attachments.
        if hand_over[0] and daemon.attachments:
            left = {name: await attachments.hand_over() for name, attachments in daemon.attachments.items()}
            if any(left.values()) and not parting.leave(ATTACHMENTS_FD, encode_handed(left)):
                log.error("cannot leave the attachments to the next imgfs; it removes them as stale")
        for attachments in daemon.attachments.values():
            await attachments.close()
        for backend in daemon.backends.values():
            backend.close()
        daemon.cache.close()
        if daemon.cache_lock >= 0:
            os.close(daemon.cache_lock)
        if daemon.catalog.source is not None:
            daemon.catalog.source.close()
        if daemon.image_api is not None:
            with trio.CancelScope(shield=True):
                await daemon.image_api.upstream.aclose()
    return hand_over[0]


async def _warm_up(daemon: Daemon) -> None:
    """Let each store pay its client libraries' set-up (imports, models) in a worker thread, before
    the first reader does."""
    for backend in daemon.backends.values():
        warm_up = getattr(backend, "warm_up", None)
        if warm_up is not None:
            await trio.to_thread.run_sync(warm_up)


class EndpointError(ImgfsError):
    """The Image API endpoint cannot listen where it was told to."""


IMAGE_API_FD = "image-api"  # the endpoint's listening socket, in systemd's fd store
CATALOG_FD = "catalog"  # the catalog's last listing, left at a hand-over
ATTACHMENTS_FD = "attachments"  # the Cinder attachments left at a hand-over, for the next imgfs to adopt


def _adopt_attachments(daemon: Daemon, data: bytes | None) -> None:
    if data is None:
        return
    try:
        left = decode_handed(data)
    except ValueError as e:
        log.warning("ignoring the attachments the last imgfs left (%s); they are removed as stale", e)
        return
    for store, handed in left.items():
        attachments = daemon.attachments.get(store)
        if attachments is None:
            log.error("the last imgfs left %d attachments of store '%s', which this configuration does not have: %s; "
                      "delete them with 'cinder attachment-delete'", len(handed), store,
                      ", ".join(h.attachment_id for h in handed))
            continue
        attachments.adopt(handed)


def _same_address(sock: socket.socket, host: str, port: int) -> bool:
    import ipaddress

    try:
        bound = sock.getsockname()
        same_host = ipaddress.ip_address(bound[0]) == ipaddress.ip_address(host)
    except (OSError, ValueError):
        return False  # a name, not an address: bind afresh rather than guess
    return sock.type == socket.SOCK_STREAM and same_host and bound[1] == port


async def _start_image_api(daemon: Daemon, nursery: trio.Nursery, handed: dict[str, int], session: Session) -> None:
    """Listen before READY=1: Cinder and Nova are pointed at the endpoint, so a node that says it is
    ready must answer there. An address that cannot be bound stops the daemon (exit 1) with one line.
    The socket the last imgfs listened on, if systemd kept it for us, is used as it is: clients that
    connected during the restart are in its queue, and none was refused."""
    from .endpoint import listen_socket
    from .endpoint import serve as serve_endpoint

    api, cfg = daemon.image_api, daemon.config.image_api
    assert api is not None and cfg is not None
    sock = None
    fd = handed.pop(IMAGE_API_FD, None)
    if fd is not None:
        sock = socket.socket(fileno=fd)
        if not _same_address(sock, cfg.host, cfg.port):  # image_api_listen changed since
            sock.close()
            sock = None
            fdstore.remove(IMAGE_API_FD)
    if sock is None:
        try:
            sock = listen_socket(cfg)
        except OSError as e:
            raise EndpointError(f"cannot listen on {daemon.config.options.image_api_listen} for the Image API endpoint "
                                f"({e.strerror or e}); change [imgfs] image_api_listen or stop what uses it") from None
        if hand_over_possible(session):
            fdstore.store(IMAGE_API_FD, sock.fileno())
    await nursery.start(serve_endpoint, api, cfg, sock)
    log.info("Image API endpoint listening on http://%s, in front of Glance at %s", daemon.config.options.image_api_listen,
             api.upstream.where)


def _watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), if the watchdog is meant for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        return None


async def _watchdog(mountpoint: str, interval: float) -> None:
    """WATCHDOG=1 only after a request went through the kernel and back through our FUSE handlers:
    a wedged FUSE loop, not just a live process, must make systemd restart us. The probe is statfs,
    which the kernel always asks the daemon (a stat of a directory is answered from the kernel's
    attribute cache for its timeout, so it proved nothing half the time)."""
    while True:
        with trio.move_on_after(interval) as scope:
            await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
        if not scope.cancelled_caught:
            notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _trim_buffers() -> None:
    """An idle daemon gives back the receive buffers it kept (only a fetch would, otherwise)."""
    while True:
        await trio.sleep(buffers.IDLE)
        freed = buffers.POOL.trim()
        if freed:
            log.debug("let go of %d MiB of idle receive buffers", freed >> 20)


async def _fuse_main(scope: trio.CancelScope) -> None:
    try:
        await pyfuse3.main(min_tasks=4, max_tasks=64)
    finally:
        scope.cancel()  # the mount is gone: so is everything that served it


async def _finish_downloads(daemon: Daemon) -> None:
    """Before a hand-over: new connections wait in the listening socket's queue for the next imgfs,
    and downloads in flight get DRAIN_TIMEOUT seconds to finish here, while the mount is still
    served (then the rest end short of their Content-Length, as on a stop)."""
    api = daemon.image_api
    if api is None or api.server is None:
        return
    server = api.server
    server.stop_accepting()
    with trio.move_on_after(DRAIN_TIMEOUT):
        await server.drained()  # each connection closes after the answer it is on
    if server.stats.connections:
        log.warning("%d Image API connections still open after %gs (%d downloads in flight): cut short",
                    server.stats.connections, DRAIN_TIMEOUT, api.stats.active)


DRAIN_TIMEOUT = 5.0  # seconds readers get at shutdown to finish their reads and close their files


async def _explain_hangup() -> None:
    """SIGHUP, the usual OpenStack "reload", would otherwise kill the daemon uncleanly (a dead mount,
    attachments left in Cinder). imgfs reads its configuration once; there is nothing to reopen either
    (journald, or an fstab mount's log opened for appending, which logrotate's copytruncate rotates)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.warning("received SIGHUP: ignored; imgfs reads its configuration only at start, so restart it "
                        "to apply a change (systemctl restart imgfs)")


async def _hand_over_on_signal(daemon: Daemon, session: Session, hand_over: list[bool]) -> None:
    """SIGUSR2 (the unit's RestartKillSignal, sent on a restart): finish the endpoint's downloads, stop
    reading FUSE requests, answer those read, and leave the mount to the next process, which systemd
    starts with the connection. Without a connection to hand over (stock pyfuse3, no fd store), the
    same as a stop."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            if not hand_over_possible(session):
                log.info("received SIGUSR2 (a restart), but this mount cannot be handed over: unmounting")
                await daemon.ops.drain(DRAIN_TIMEOUT)
            else:
                log.info("received SIGUSR2 (a restart): finishing what is in flight, then leaving the mount "
                         "to the next imgfs")
                await _finish_downloads(daemon)
                parting.leave(CATALOG_FD, daemon.catalog.snapshot())
                hand_over[0] = True
            pyfuse3.terminate()
            return


async def _stop_on_signal(ops: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: refusing new reads, unmounting", signal.Signals(signum).name)
            reads, files = await ops.drain(DRAIN_TIMEOUT)
            if reads or files:
                log.warning("unmounting with %d reads in flight and %d files open after %gs; their readers get ENOTCONN",
                            reads, files, DRAIN_TIMEOUT)
            pyfuse3.terminate()
            return
