"""The control channel: a root-only unix socket the CLI talks to (``imgfs status``, ``warm``, ``evict``,
``metrics``), and optionally Prometheus metrics on a 127.0.0.1 port. Nothing listens on the network
unless ``metrics_port`` is set, and then only on loopback.

Protocol: one JSON request line per connection; one JSON answer line, or for ``warm`` one progress
line per chunk and a final ``{"done": ...}`` line. Closing the connection cancels a warm.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import trio

from . import errors as error_classes
from .errors import ImgfsError

if TYPE_CHECKING:
    from .attach import Attachments
    from .backends.base import Backend
    from .cache import ChunkCache
    from .catalog import Catalog
    from .config import Config
    from .endpoint import ImageApi
    from .fleet.node import FleetNode
    from .reader import ChunkFetcher


class Daemon(Protocol):
    """What the control socket reads and steers: the parts of a running mount, not the daemon module
    (which starts this one), so the two do not import each other."""

    config: "Config"
    mountpoint: str
    backends: "dict[str, Backend]"
    cache: "ChunkCache"
    catalog: "Catalog"
    fetcher: "ChunkFetcher"
    attachments: "dict[str, Attachments]"
    image_api: "ImageApi | None"
    fleet: "FleetNode | None"

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


def _count_tasks(task: trio.lowlevel.Task, counts: dict[str, int]) -> dict[str, int]:
    # pyfuse3's request workers are a pool that grows under load up to max_tasks and stays: counted apart
    kind = "fuse_workers" if task.name.startswith("pyfuse-") else "tasks"
    counts[kind] = counts.get(kind, 0) + 1
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            _count_tasks(child, counts)
    return counts


def process() -> dict[str, Any]:
    """What a leak would show: tasks, worker threads busy in a blocking call (idle ones wait in trio's
    thread cache and exit on their own), open fds, resident memory."""
    busy = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_handle_job" and frame.f_code.co_filename.endswith("_thread_cache.py"):
                busy += 1
                break
            frame = frame.f_back
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return {**_count_tasks(trio.lowlevel.current_root_task(), {"tasks": 0, "fuse_workers": 0}), "threads": threading.active_count(),
            "busy_threads": busy, "fds": len(os.listdir("/proc/self/fd")), "rss_bytes": rss}


def status(d: Daemon) -> dict[str, Any]:
    """Everything `imgfs status` shows; never a secret (stores are described by backend.describe())."""
    cache, fetcher = d.cache, d.fetcher
    lookups = cache.stats.hits + cache.stats.memory_hits + cache.stats.misses
    images = []
    for image_id in d.catalog.image_ids():
        image = d.catalog.image(image_id)
        if image is None:
            continue
        fraction = fetcher.cached_fraction(image.primary)
        if fraction > 0:
            images.append({"image": image_id, "name": image.name, "size": image.size, "store": image.primary.store,
                           "cached_fraction": round(fraction, 4)})
    return {
        "mount": d.mountpoint,
        "stores": [
            {"name": b.name, **b.describe(), "reachable": d.catalog.stores[b.name].reachable,
             "images": d.catalog.stores[b.name].images, "error": d.catalog.stores[b.name].error}
            for b in d.backends.values()
        ],
        "images": len(d.catalog.image_ids()),
        "cache": {
            "dir": cache.root, "disk_ok": cache.disk_ok, "bytes": cache.used_bytes, "limit_bytes": cache.max_bytes,
            "chunks": cache.count, "limit_chunks": cache.max_count, "hits": cache.stats.hits,
            "loop_hits": cache.stats.loop_hits, "memory_hits": cache.stats.memory_hits, "misses": cache.stats.misses,
            "hit_rate": round((cache.stats.hits + cache.stats.memory_hits) / lookups, 4) if lookups else None,
            "evictions": cache.stats.evictions, "corrupt": cache.stats.corrupt, "fill_failures": cache.stats.fill_failures,
            "direct_fills": cache.stats.direct_fills,
            "fill_writes": "direct" if cache.direct.enabled else f"buffered ({cache.direct.refused})",
            "open_files": cache.open_files, "limit_open_files": cache.max_open,
        },
        "bytes_served": d.ops.bytes_served,
        "fetched_bytes": fetcher.stats.fetched_bytes,
        "fetches": fetcher.stats.fetches,
        "inflight_fetches": fetcher.inflight,
        "errors": dict(fetcher.stats.errors),
        "attachments": [a for att in d.attachments.values() for a in att.status()],
        "attachment_totals": [att.totals() for att in d.attachments.values()],
        "pinned": [image for _, image in cache.pinned],
        "cached_images": images,
        "image_api": None if d.image_api is None else {
            "listen": d.config.options.image_api_listen, "upstream": d.image_api.upstream.where,
            **d.image_api.stats.as_dict(),
            "http": d.image_api.http.as_dict(),
        },
        "fleet": None if d.fleet is None else d.fleet.status(),
        "process": process(),
    }


def metrics(d: Daemon) -> bytes:
    """The Prometheus text format, built at scrape time from the daemon's own counters."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    s = status(d)

    def by_status(name: str, doc: str, counts: dict) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["status"])
        for status_code, value in counts.items():
            family.add_metric([str(status_code)], value)
        return family

    class Collector:
        def collect(self):
            c = s["cache"]
            for name, value, doc in (("cache_hits", c["hits"] + c["memory_hits"], "chunk reads served by the cache"),
                                     ("cache_misses", c["misses"], "chunk reads the cache could not serve"),
                                     ("cache_evictions", c["evictions"], "chunks evicted (LRU)"),
                                     ("cache_corrupt_chunks", c["corrupt"], "chunks that failed verification"),
                                     ("cache_direct_fills", c["direct_fills"], "chunks written to the cache with O_DIRECT"),
                                     ("fetches", s["fetches"], "store requests"),
                                     ("bytes_served", s["bytes_served"], "bytes returned to readers")):
                yield CounterMetricFamily(f"imgfs_{name}", doc, value=value)
            fetched = CounterMetricFamily("imgfs_fetched_bytes", "bytes fetched from stores", labels=["store"])
            for store, value in d.fetcher.stats.bytes_by_store.items():
                fetched.add_metric([store], value)
            yield fetched
            errors = CounterMetricFamily("imgfs_errors", "read errors by kind and the errno readers got",
                                         labels=["kind", "errno"])
            for kind, value in s["errors"].items():
                cls = getattr(error_classes, kind, ImgfsError)
                errors.add_metric([kind, errno.errorcode.get(cls.errno, str(cls.errno))], value)
            yield errors
            yield GaugeMetricFamily("imgfs_cache_bytes", "bytes in the chunk cache", value=c["bytes"])
            yield GaugeMetricFamily("imgfs_cache_chunks", "chunks in the chunk cache", value=c["chunks"])
            yield GaugeMetricFamily("imgfs_inflight_fetches", "fetches in flight", value=s["inflight_fetches"])
            yield GaugeMetricFamily("imgfs_attachments", "Cinder volumes attached by this host",
                                    value=sum(1 for a in s["attachments"] if a["attached"]))
            for name, key, doc in (("attachments_made", "attaches", "Cinder attachments made"),
                                   ("attachment_seconds", "seconds_held", "seconds Cinder attachments were held"),
                                   ("attachment_fetches", "fetches", "fetches that held a Cinder attachment"),
                                   ("detaches_image_gone", "detaches_image_gone",
                                    "detaches because the image left the catalog")):
                family = CounterMetricFamily(f"imgfs_{name}", doc, labels=["store"])
                for t in s["attachment_totals"]:
                    family.add_metric([t["store"]], t[key])
                yield family
            up = GaugeMetricFamily("imgfs_store_reachable", "1 if the store's last listing worked", labels=["store"])
            for store in s["stores"]:
                up.add_metric([store["name"]], 1 if store["reachable"] else 0)
            yield up
            api = s["image_api"]
            if api is not None:
                downloads = CounterMetricFamily("imgfs_image_api_downloads", "image downloads through the Image API "
                                                "endpoint, by who answered them", labels=["served_by"])
                downloads.add_metric(["imgfs"], api["local_downloads"])
                downloads.add_metric(["glance"], api["passthrough_downloads"])
                yield downloads
                moved = CounterMetricFamily("imgfs_image_api_bytes", "bytes through the Image API endpoint",
                                            labels=["path"])
                for path, key in (("local", "local_bytes"), ("glance_down", "passthrough_bytes_down"),
                                  ("glance_up", "passthrough_bytes_up")):
                    moved.add_metric([path], api[key])
                yield moved
                yield CounterMetricFamily("imgfs_image_api_requests_passed", "other requests passed to Glance",
                                          value=api["passthrough_requests"])
                yield CounterMetricFamily("imgfs_image_api_aborted", "local downloads ended before their last byte",
                                          value=api["aborted"])
                yield by_status("imgfs_image_api_refusals", "downloads Glance refused the caller, by Glance's status",
                                api["refusals"])
                yield by_status("imgfs_image_api_upstream_errors", "requests answered 502/503/504 because Glance could "
                                "not be reached or did not answer", api["upstream_errors"])
                yield GaugeMetricFamily("imgfs_image_api_active", "requests in flight", value=api["active"])
                http = api["http"]
                yield GaugeMetricFamily("imgfs_image_api_connections", "client connections open now",
                                        value=http["connections"])
                closed = CounterMetricFamily("imgfs_image_api_connections_closed", "client connections imgfs closed "
                                             "because a limit was hit (busy: image_api_max_connections)", labels=["reason"])
                closed.add_metric(["busy"], http["refused_busy"])
                for kind, value in http["timeouts"].items():
                    closed.add_metric([f"{kind}_timeout"], value)
                yield closed
                yield by_status("imgfs_image_api_requests_refused", "requests imgfs refused before any work (400 "
                                "framing, 408, 414, 431, 501) or failed (500)", http["refused"])
            fleet = s["fleet"]
            if fleet is not None:
                moved = CounterMetricFamily("imgfs_fleet_bytes", "chunk bytes of large images by where they came from "
                                            "(mesh, origin after a fallback), and of small ones (bypass)", labels=["source"])
                for source, key in (("mesh", "mesh_bytes"), ("origin", "origin_bytes"), ("bypass", "bypass_bytes")):
                    moved.add_metric([source], fleet[key])
                yield moved
                falls = CounterMetricFamily("imgfs_fleet_fallbacks", "chunk reads the mesh did not answer right, "
                                            "read from the origin instead", labels=["cause"])
                for cause, value in fleet["fallbacks"].items():
                    falls.add_metric([cause], value)
                yield falls
                again = CounterMetricFamily("imgfs_fleet_retries", "chunk reads asked of the mesh a second time (an "
                                            "owner lost mid-answer: the ring's next owner answers)", labels=["cause"])
                for cause, value in fleet["retries"].items():
                    again.add_metric([cause], value)
                yield again
                yield CounterMetricFamily("imgfs_fleet_served_bytes", "bytes the origin gateway sent this node's nginx",
                                          value=fleet["served_bytes"])
                yield CounterMetricFamily("imgfs_fleet_sums_checked_bytes", "mesh bytes checked block by block against "
                                          "the chunk sums stored beside the image", value=fleet["sums_checked_bytes"])
                sums = CounterMetricFamily("imgfs_fleet_chunk_sums", "chunk-sums lists by what became of them "
                                           "(published, publish_refused, publish_failed, read_failed, unusable, "
                                           "rejected)", labels=["outcome"])
                for outcome, value in fleet["sums"].items():
                    sums.add_metric([outcome], value)
                yield sums
                yield by_status("imgfs_fleet_gateway_refusals", "gateway requests refused (403 not our nginx, 404 not in "
                                "the catalog, 412 another version, 502 the origin failed)", fleet["refusals"])
            stats = d.fetcher.stats
            yield HistogramMetricFamily("imgfs_fetch_seconds", "store request latency",
                                        buckets=stats.latency_buckets(), sum_value=stats.latency_sum)

    registry = CollectorRegistry()
    registry.register(Collector())
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_open_fds, ...
    return generate_latest(registry)


async def warm(d: Daemon, image_id: str, send, *, pin: bool = False, rate: float = 0.0) -> dict[str, Any]:
    """Fetch every chunk of an image into the cache, in order, through the normal read path (so
    single-flight and the prefetch slots apply: demand reads are never starved)."""
    image = d.catalog.image(image_id) or await d.catalog.lookup(image_id)
    if image is None:
        raise ImgfsError(f"no such image: {image_id}")
    loc = d.fetcher.order(image.locations)[0]
    fetcher = d.fetcher
    chunks = -(-loc.size // fetcher.chunk_size)
    step = max(1, 32 * 1024 * 1024 // fetcher.chunk_size)  # one ranged request per step
    start, done = time.monotonic(), 0
    # A Cinder copy is held by each fetch of the warm (and the grace between them), not by the warm.
    for first in range(0, chunks, step):
        last = min(first + step, chunks)
        await fetcher.warm(loc, first, last)
        done = min(loc.size, last * fetcher.chunk_size)
        if rate:  # pace to the asked average, so a warm can share a thin link politely
            await trio.sleep_until(trio.current_time() + max(0.0, done / rate - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        await send({"image": image_id, "bytes": done, "total": loc.size, "rate": done / elapsed if elapsed else None})
    if pin:
        await d.cache.pin(loc.store, image_id)
    return {"done": image_id, "pinned": pin, "bytes": done, "seconds": round(time.monotonic() - start, 3), "store": loc.store}


async def unpin(d: Daemon, image_id: str | None) -> dict[str, Any]:
    pins = [p for p in d.cache.pinned if image_id is None or p[1] == image_id]
    for store, image in pins:
        await d.cache.pin(store, image, pinned=False)
    return {"unpinned": len(pins)}


async def evict(d: Daemon, image_id: str | None) -> dict[str, Any]:
    ids = d.catalog.image_ids() if image_id is None else [image_id]
    dropped = lifted = 0
    for i in ids:
        image = d.catalog.image(i)
        for loc in image.locations if image else ():
            dropped += await d.cache.drop(loc.store, i)
        lifted += d.fetcher.lift_quarantine(i)
    log.info("evicted %d cached chunks of %s on request%s", dropped, image_id or f"all {len(ids)} images",
             f"; {lifted} copies that failed verification may be read again" if lifted else "")
    return {"evicted_chunks": dropped, "images": len(ids), "quarantine_lifted": lifted}


def _one_client(what: str, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A client's connection can end only its own handler. serve_listeners runs handlers in its nursery,
    so anything a handler lets out (a reset connection: BrokenResourceError; a bug) would end the
    daemon, the mount with it. The metrics port listens on 127.0.0.1, where any local user can reach it."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-request or mid-answer
        except Exception:
            log.exception("internal error answering a %s client; closed that connection", what)

    return run


async def _read_request(stream: trio.SocketStream, end: bytes) -> bytes | None:
    """Bytes up to ``end`` (bounded by MAX_REQUEST); None if the peer went away first."""
    buf = b""
    while end not in buf and len(buf) < MAX_REQUEST:
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    return buf


async def _handle(d: Daemon, stream: trio.SocketStream) -> None:
    async with stream:
        buf = await _read_request(stream, b"\n")
        if buf is None:
            return

        async def send(obj: dict[str, Any]) -> None:
            await stream.send_all(json.dumps(obj).encode() + b"\n")

        try:
            request = json.loads(buf.split(b"\n", 1)[0])
            cmd = request.get("cmd")
            if cmd == "status":
                await send(status(d))
            elif cmd == "metrics":
                await send({"text": metrics(d).decode()})
            elif cmd == "warm":
                await send(await warm(d, str(request["image"]), send, pin=bool(request.get("pin")),
                                      rate=float(request.get("rate") or 0)))
            elif cmd == "unpin":
                await send(await unpin(d, request.get("image")))
            elif cmd == "evict":
                await send(await evict(d, request.get("image")))
            else:
                await send({"error": f"unknown command {cmd!r}"})
        except (ValueError, KeyError, TypeError) as e:
            await send({"error": f"bad request: {type(e).__name__}"})
        except ImgfsError as e:
            await send({"error": str(e)})
        except trio.BrokenResourceError:
            pass  # the client went away (e.g. Ctrl-C during warm): stop quietly


async def serve_socket(d: Daemon, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # another user could swap the socket for theirs
        raise PermissionError(errno.EACCES, f"{directory} must be owned by us and writable by no one else")
    # Bound under a temporary name and renamed once listening: a client that sees the socket can
    # connect (no ECONNREFUSED window), and a crashed daemon's socket is replaced atomically.
    fresh = f"{path}.{os.getpid()}"
    try:
        os.unlink(fresh)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)  # root-only from the first instant, not after a chmod race
    try:
        await sock.bind(fresh)
    finally:
        os.umask(old)
    sock.listen(16)
    os.rename(fresh, path)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(_one_client("control socket", lambda stream: _handle(d, stream)), [listener])
    finally:
        with trio.CancelScope(shield=True):
            try:
                os.unlink(path)
            except OSError:
                pass


async def serve_metrics(d: Daemon, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP endpoint on 127.0.0.1: GET anything -> the Prometheus text format."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(10):
                if await _read_request(stream, b"\r\n\r\n") is None:
                    return
                body = metrics(d)
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                try:
                    await stream.send_all(head + body)
                except trio.BrokenResourceError:
                    pass

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(_one_client("metrics port", handle), listeners)
