"""Command line: argv -> config -> daemon, with one-line errors and exit codes systemd understands.

Exit codes: 0 clean stop; 1 runtime failure (worth a restart); 2 bad configuration or usage (a restart
would fail the same way: the unit sets RestartPreventExitStatus=2).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from . import __version__
from .config import CinderStoreConfig, Config, S3StoreConfig
from .errors import ConfigError, ImgfsError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEFAULT_CONFIG = "/etc/imgfs/imgfs.conf"

log = logging.getLogger("imgfs")

# Their DEBUG output carries request headers (the access key id is in every Authorization header),
# connection properties (os-brick) or tokens (keystoneauth): kept at WARNING even under --debug.
# httpx logs each request.
_CHATTY_LIBRARIES = ("botocore", "boto3", "urllib3", "s3transfer", "os_brick", "oslo_privsep", "oslo.privsep",
                     "oslo_concurrency", "keystoneauth", "keystoneauth1", "cinderclient", "stevedore",
                     "httpx", "httpcore")


class RedactSecrets(logging.Filter):
    """Last line of defence: whatever a message says, configured secrets are replaced by ***."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        from urllib.parse import quote, quote_plus

        # as written, and as URL-encoded in a logged URL or form body
        forms = {form for s in secrets if s and len(s) >= 4 for form in (s, quote(s, safe=""), quote_plus(s))}
        self.secrets = sorted(forms, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = message
            for secret in self.secrets:
                cleaned = cleaned.replace(secret, "***")
            if cleaned != message or record.exc_info:
                record.msg, record.args = cleaned, None
                if record.exc_info:  # tracebacks may quote locals: format and clean them too
                    text = logging.Formatter().formatException(record.exc_info)
                    for secret in self.secrets:
                        text = text.replace(secret, "***")
                    record.msg = f"{cleaned}\n{text}"
                    record.exc_info, record.exc_text = None, None
        return True


def setup_logging(level: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd the journal stamps each line itself.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # os-brick warns at every start about initiators this host does not have (iSCSI, NVMe) and privsep
    # relays eventlet's deprecation notice: noise. Their real failures reach us as exceptions.
    for name in ("os_brick", "oslo_privsep", "oslo.privsep"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if level == "DEBUG" else logging.WARNING)
    return handler


def secrets_of(config: Config) -> list[str]:
    found: list[str] = []
    for store in config.stores:
        if isinstance(store, S3StoreConfig):
            found += [store.access_key, store.secret_key]
        elif isinstance(store, CinderStoreConfig):
            found += [store.password, store.application_credential_secret or ""]
            if store.rbd_keyring_file:
                try:
                    with open(store.rbd_keyring_file) as f:
                        found += re.findall(r"^\s*key\s*=\s*(\S+)", f.read(), re.MULTILINE)
                except OSError:
                    pass
    if config.glance is not None:
        found.append(config.glance.password)
    if config.image_api is not None and config.image_api.auth is not None:
        found.append(config.image_api.auth.password)
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfs",
        description="Serve cloud disk images (Glance S3 and file stores) as plain raw files in a read-only "
        "FUSE mount, through a verified local chunk cache.",
        epilog="Exit codes: 0 clean stop, 1 runtime failure, 2 configuration or usage error. "
        "See 'imgfs COMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"imgfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config-file", action="append", dest="config_files", metavar="PATH",
            help="INI file to read; repeat to merge several (later wins option by option), e.g. "
            "glance-api.conf for the store stanzas and imgfs.conf for [imgfs]. Default: " + DEFAULT_CONFIG,
        )
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
        p.add_argument("--debug", action="store_true", help="same as --log-level DEBUG")

    mount = sub.add_parser(
        "mount", help="mount the images and serve them (foreground)",
        description="Mount MOUNTPOINT and serve in the foreground until SIGTERM/SIGINT, then unmount. "
        "Logs go to stderr. Ready (and, under systemd, READY=1) once the mount answers. Layout: "
        "MOUNTPOINT/images/<image id> (every image), MOUNTPOINT/stores/<store>/<image id> (each copy); "
        "xattrs user.imgfs.* describe each file.",
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    config_args(mount)
    mount.add_argument("--allow-other", action="store_true", help="let users other than root read the mount "
                       "(same as [imgfs] allow_other = true; needs user_allow_other in /etc/fuse.conf for non-root)")

    check = sub.add_parser("check-config", help="validate the configuration and print what it declares",
                           description="Read the config files as 'mount' would and print the stores and options "
                           "(never a secret). With --probe, also list each store. Exit 0 if all is well, "
                           "2 on a config error, 1 if a store cannot be listed.")
    config_args(check)
    check.add_argument("--probe", action="store_true", help="also list each store to prove it answers")

    verify = sub.add_parser("verify", help="read images end to end through the mount and check their digest",
                            description="Stream each image through the mount (the normal read path, so the "
                            "daemon verifies and caches it too) and compare it with the digest the catalog "
                            "knows: Glance's os_hash_value (sha512), else its md5 checksum, else the S3 ETag "
                            "when it is an MD5. A mismatch makes the daemon drop the image's cached chunks. "
                            "Exit 0 if every image matches, 1 otherwise, 2 on bad usage.")
    verify.add_argument("images", nargs="+", metavar="PATH", help="an image file in the mount (images/<id>)")

    def control_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mount", default="/var/lib/imgfs/mnt", help="the mount to talk to (default /var/lib/imgfs/mnt)")
        p.add_argument("--socket", help="its control socket (default: derived from --mount, or [imgfs] control_socket)")

    st = sub.add_parser("status", help="what a running mount is doing: stores, cache, attachments, errors",
                        description="Ask a running mount (over its root-only control socket) for its stores "
                        "(reachable?), cache (bytes, chunks, limits, hit rate, evictions), Cinder attachments "
                        "(volume, refcount, idle for), cached images, fetches in flight and errors by kind.")
    control_args(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    warm = sub.add_parser("warm", help="fetch whole images into the cache ahead of time",
                          description="Fetch every chunk of each image into the cache (before a boot storm), "
                          "through the prefetch slots so demand reads are never starved. Shows progress; Ctrl-C "
                          "cancels.")
    control_args(warm)
    warm.add_argument("images", nargs="+", metavar="IMAGE", help="image id")
    warm.add_argument("--json", action="store_true", help="progress as JSON lines")
    warm.add_argument("--pin", action="store_true", help="keep the images from eviction until 'imgfs unpin'")
    warm.add_argument("--rate-mb", type=float, default=0, metavar="MB/S", help="limit the warm to this many MB/s")
    unpin = sub.add_parser("unpin", help="let pinned images be evicted again", description="Undo 'imgfs warm --pin'.")
    control_args(unpin)
    unpin.add_argument("images", nargs="*", metavar="IMAGE")
    unpin.add_argument("--all", action="store_true", help="unpin every image")
    evict = sub.add_parser("evict", help="drop images from the cache", description="Drop every cached chunk of "
                           "the given images (or of all images with --all).")
    control_args(evict)
    evict.add_argument("images", nargs="*", metavar="IMAGE")
    evict.add_argument("--all", action="store_true", help="evict every image")
    met = sub.add_parser("metrics", help="print the mount's Prometheus metrics",
                         description="Print the Prometheus text format (also served on 127.0.0.1:[imgfs] metrics_port when set).")
    control_args(met)

    fleet = sub.add_parser("fleet", help="fleet mode: the nginx mesh of this node",
                           description="Fleet mode ([fleet] in imgfs.conf): chunks of large images are fetched "
                           "once for the whole fleet through a consistent-hash nginx mesh.")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    render = fleet_sub.add_parser("render", help="write this node's nginx configuration and check it with nginx -t",
                                  description="Write [fleet] nginx_dir/nginx.conf (mode 0600: it holds the gateway "
                                  "secret) from [fleet], create the secret_file if there is none, the cache "
                                  "directories, and check the result with 'nginx -t' before it replaces the old one. "
                                  "Then 'systemctl reload imgfs-mesh' (members changes need no imgfs restart).")
    config_args(render)
    render.add_argument("--no-check", action="store_true", help="do not run nginx -t (no nginx on this machine)")
    render.add_argument("--worker-user", default="www-data",
                        help="the user nginx's workers run as, owner of the cache (default www-data, Debian's)")
    render.add_argument("--workers", default="auto", help="nginx worker_processes (default auto)")

    demo = sub.add_parser("demo", help="run a self-contained demonstration on loopback",
                          description="Build a small ext4 disk image, serve it from a local S3 server (moto) on "
                          "127.0.0.1 as a Glance-style object, mount it with imgfs, read it back and check its "
                          "sha256, then wait for Ctrl-C.")
    demo.add_argument("--workdir", default="/tmp/imgfs-demo", help="where to put everything (default /tmp/imgfs-demo)")
    demo.add_argument("--size-mib", type=int, default=64, help="size of the demo disk image (default 64)")
    demo.add_argument("--no-wait", action="store_true", help="stop right after the checks instead of waiting for Ctrl-C")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = "DEBUG" if getattr(args, "debug", False) else getattr(args, "log_level", "INFO")
    handler = setup_logging(level)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.workdir, args.size_mib, wait=not args.no_wait)
        if args.command == "verify":
            return _verify(args.images)
        if args.command in ("status", "warm", "evict", "unpin", "metrics"):
            return _control(args)
        from . import config as config_mod

        files = args.config_files or [DEFAULT_CONFIG]
        config = config_mod.load(files)
        handler.addFilter(RedactSecrets(secrets_of(config)))
        for warning in config.warnings:
            log.warning("config: %s", warning)
        if args.command == "check-config":
            return _check_config(config, probe=args.probe)
        if args.command == "fleet":
            from .fleet.render import render

            done = render(config, check=not args.no_check, worker_user=args.worker_user or None, workers=args.workers)
            log.info("wrote %s%s%s", done.conf_path, " (nginx -t: ok)" if done.checked else " (not checked: no nginx)",
                     f"; made the gateway secret {config.fleet.secret_file}" if done.secret_created and config.fleet else "")
            return EXIT_OK
        if args.allow_other:
            from dataclasses import replace

            config = replace(config, options=replace(config.options, allow_other=True))
        return _mount(config, args.mountpoint)
    except ConfigError as e:
        log.error("config error: %s", e)
        if args.command == "mount":
            from .handover.session import give_up

            give_up(args.mountpoint)  # a mount the last imgfs handed over: nobody else will serve it
        return EXIT_CONFIG
    except ImgfsError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _mount(config: Config, mountpoint: str) -> int:
    import trio

    from .daemon import serve

    try:
        handed_over = trio.run(serve, config, mountpoint)
        if handed_over:
            # The next imgfs starts once this process is gone, and readers wait until it answers: skip
            # the interpreter's teardown (half a second of joining library threads); everything of
            # ours is closed, the logs are flushed, and systemd reaps the rest of the unit.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_OK)
    except ImgfsError:
        raise
    except BaseExceptionGroup as group:  # raised inside the daemon's nursery, so it comes wrapped
        mine = group.subgroup(lambda e: isinstance(e, ImgfsError))
        if mine is None:
            log.exception("imgfs stopped on an unexpected error")
            return EXIT_FAILURE
        while isinstance(mine, BaseExceptionGroup):
            mine = mine.exceptions[0]
        raise mine from None
    except Exception:
        log.exception("imgfs stopped on an unexpected error")
        return EXIT_FAILURE
    return EXIT_OK


def _ask(path: str, request: dict):
    """Send one request to a mount's control socket; yield its answer lines."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ImgfsError(f"no control socket at {path}: is imgfs mounted there? (see --mount / --socket)") from None
        except PermissionError:
            raise ImgfsError(f"permission denied on {path}: the control socket is root-only") from None
        except ConnectionRefusedError:
            raise ImgfsError(f"{path}: nobody listens (a stale socket of a stopped daemon?)") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        for line in sock.makefile("rb"):
            answer = json.loads(line)
            if "error" in answer:
                raise ImgfsError(answer["error"])
            yield answer


def _control(args) -> int:
    import json

    from .daemon import control_socket_path

    path = args.socket or control_socket_path("", args.mount)
    if args.command == "status":
        (answer,) = list(_ask(path, {"cmd": "status"}))
        print(json.dumps(answer, indent=2) if args.json else _status_table(answer))
    elif args.command == "metrics":
        (answer,) = list(_ask(path, {"cmd": "metrics"}))
        print(answer["text"], end="")
    elif args.command in ("evict", "unpin"):
        if not args.images and not args.all:
            log.error("name the images to %s, or --all", args.command)
            return EXIT_CONFIG
        for image in [None] if args.all else args.images:
            (answer,) = list(_ask(path, {"cmd": args.command, "image": image}))
            if args.command == "evict":
                print(f"evicted {answer['evicted_chunks']} chunks of {image or 'all images'}")
            else:
                print(f"unpinned {answer['unpinned']} image(s)")
    else:
        for image in args.images:
            request = {"cmd": "warm", "image": image, "pin": args.pin, "rate": args.rate_mb * 1e6}
            for answer in _ask(path, request):
                if args.json:
                    print(json.dumps(answer), flush=True)
                elif "done" in answer:
                    pinned = " (pinned)" if answer.get("pinned") else ""
                    print(f"\r{image}: warmed {answer['bytes'] / 2**20:.0f} MiB from {answer['store']} in {answer['seconds']:.1f}s{pinned}" + " " * 20)
                else:
                    left = (answer["total"] - answer["bytes"]) / answer["rate"] if answer.get("rate") else 0
                    bar = "#" * int(30 * answer["bytes"] / max(answer["total"], 1))
                    print(f"\r{image}: [{bar:<30}] {answer['bytes'] / 2**20:7.0f}/{answer['total'] / 2**20:.0f} MiB "
                          f"{(answer.get('rate') or 0) / 1e6:6.0f} MB/s ETA {left:4.0f}s", end="", flush=True)
    return EXIT_OK


def _status_table(s: dict) -> str:
    c = s["cache"]
    lines = [f"mount   {s['mount']}  ({s['images']} images)"]
    for st in s["stores"]:
        state = "ok" if st["reachable"] else ("DOWN: " + st["error"] if st["reachable"] is False else "listing")
        lines.append(f"store   {st['name']:<14} {st['type']:<7} {st['images']:>6} images  {state}")
    hit = "n/a" if c["hit_rate"] is None else f"{c['hit_rate'] * 100:.1f}%"
    lines.append(f"cache   {c['bytes'] / 2**30:.2f} of {c['limit_bytes'] / 2**30:.2f} GiB, {c['chunks']} of {c['limit_chunks']} "
                 f"chunks, hit rate {hit}, {c['evictions']} evictions, {c['corrupt']} corrupt, {c['fill_failures']} failed fills, "
                 f"{c['fill_writes']} writes" + ("" if c["disk_ok"] else "  (DISK CACHE OFF)"))
    lines.append(f"fetch   {s['fetches']} requests, {s['fetched_bytes'] / 2**20:.0f} MiB, {s['inflight_fetches']} in flight, "
                 f"errors: {', '.join(f'{k} {v}' for k, v in s['errors'].items()) or 'none'}")
    p = s["process"]
    lines.append(f"process {p['rss_bytes'] / 2**20:.0f} MiB resident, {p['fds']} fds, {p['threads']} threads "
                 f"({p['busy_threads']} busy), {p['tasks']} tasks, {p['fuse_workers']} FUSE workers")
    api = s.get("image_api")
    if api:
        refused = ", ".join(f"{k} x{v}" for k, v in api["refusals"].items()) or "none"
        lines.append(f"api     http://{api['listen']} -> {api['upstream']}: {api['local_downloads']} downloads served "
                     f"({api['local_bytes'] / 2**20:.0f} MiB, {api['aborted']} ended early), {api['passthrough_downloads']} "
                     f"passed to Glance, {api['passthrough_requests']} other requests, refused by Glance: {refused}, "
                     f"{api['active']} in flight")
    for t in s.get("attachment_totals", ()):
        if t["attaches"]:
            lines.append(f"attach  store {t['store']}: {t['attaches']} attachments made, held {t['seconds_held']:.0f}s in all, "
                         f"{t['fetches_per_attach']} fetches each, {t['detaches_image_gone']} given up as the image left")
    for a in s["attachments"]:
        idle = "in use" if a["idle_for"] is None else f"idle {a['idle_for']:.0f}s"
        lines.append(f"attach  {a['volume_id']} (store {a['store']}) {a['refcount']} fetches in flight, {idle}"
                     + ("" if a["attached"] else " (not attached)") + (f" (gone: {a['gone']})" if a["gone"] else ""))
    for i in s["cached_images"]:
        pinned = ", pinned" if i["image"] in s["pinned"] else ""
        lines.append(f"image   {i['image']} {i['name'] or ''} {i['size'] / 2**20:.0f} MiB from {i['store']}: "
                     f"{i['cached_fraction'] * 100:.0f}% cached{pinned}")
    return "\n".join(lines)


def _expected_digest(path: str) -> tuple[str, str] | None:
    def attr(name: str) -> str | None:
        try:
            return os.getxattr(path, f"user.imgfs.{name}").decode()
        except OSError:
            return None

    algo, value = attr("os_hash_algo"), attr("os_hash_value")
    if algo and value:
        return algo, value
    if attr("checksum"):
        return "md5", attr("checksum")  # type: ignore[return-value]
    version = attr("version") or ""
    if re.fullmatch(r"[0-9a-f]{32}", version):  # a single-part S3 upload's ETag is the MD5 of the object
        return "md5", version
    return None


def _quarantine(path: str) -> None:
    """After a mismatch: ask the mount the file belongs to to drop the image's cached chunks."""
    from .daemon import control_socket_path

    image_id = os.path.basename(path)
    mount = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.dirname(os.path.abspath(path))) != "images":
        mount = os.path.dirname(os.path.dirname(mount))  # stores/<store>/<id>
    try:
        list(_ask(control_socket_path("", mount), {"cmd": "evict", "image": image_id}))
        log.info("%s: dropped its cached chunks", path)
    except ImgfsError as e:
        log.warning("%s: could not drop its cached chunks: %s", path, e)


def _verify(paths: list[str]) -> int:
    import hashlib
    import time

    failures = 0
    for path in paths:
        if not os.path.isfile(path):
            log.error("%s: not an image file in an imgfs mount", path)
            return EXIT_CONFIG
        expected = _expected_digest(path)
        if expected is None:
            log.error("%s: the catalog knows no digest for this image (no os_hash_value, checksum or MD5 ETag)", path)
            failures += 1
            continue
        algo, value = expected
        digest = hashlib.new(algo)
        start = time.monotonic()
        try:
            with open(path, "rb") as f:
                while block := f.read(4 << 20):
                    digest.update(block)
        except OSError as e:
            log.error("%s: FAILED: %s (an integrity error drops the image's cached chunks; see the daemon log)", path, e.strerror)
            failures += 1
            continue
        ok = digest.hexdigest() == value.lower()
        if not ok:
            _quarantine(path)
        size = os.path.getsize(path)
        (log.info if ok else log.error)("%s: %s %s %s (%.0f MB/s)", path, algo, "OK" if ok else "MISMATCH, expected " + value,
                                        "" if ok else "got " + digest.hexdigest(), size / max(time.monotonic() - start, 1e-6) / 1e6)
        failures += not ok
    return EXIT_FAILURE if failures else EXIT_OK


def _check_config(config: Config, *, probe: bool) -> int:
    from .backends import build

    failures = 0
    print(f"config files: {', '.join(config.files)}")
    for store in config.stores:
        backend = build(store, config.options)
        described = " ".join(f"{k}={v}" for k, v in backend.describe().items())
        line = f"store {store.name}: {described}"
        if probe:
            try:
                line += f" -- {len(backend.list_images())} images"
            except ImgfsError as e:
                line += f" -- FAILED: {e}"
                failures += 1
        print(line)
        backend.close()
    if config.image_api is not None:
        api = config.image_api
        print(f"image API endpoint: http://{config.options.image_api_listen} in front of "
              f"{api.upstream or 'the image service of the Keystone catalog at ' + (api.auth.auth_url if api.auth else '?')}")
    for name, value in sorted(vars(config.options).items()):
        print(f"[imgfs] {name} = {value}")
    return EXIT_FAILURE if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
