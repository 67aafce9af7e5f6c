"""bench/run-restart: what a reader and an Image API client see while imgfs restarts, under a real
systemd 252 (tests/nspawnkit.py: the shipped units in a Debian 12 root booted in systemd-nspawn).

- planned: ``systemctl restart imgfs.service`` (the mount and the endpoint's socket handed over),
  --restarts times, 2.2 s apart (systemd's default start limit is 5 starts in 10 s);
- crash: ``systemctl kill -s KILL`` (Restart=on-failure, RestartSec=1; the next process adopts the
  mount and has the kernel resend what the dead one had read), --crashes times, 3 s apart.

The reader, in the container, reads a 512 MiB image (file store) 1 MiB at a time with O_DIRECT, so
every read is a FUSE request (the page cache would hide a gap), round and round, and checks each MiB
against the source's crc32. The restart gap is the longest read that overlaps a restart. The endpoint
client (with the lab up: the Glance catalog, the lab's S3 and Cinder stores; --no-endpoint skips it)
GETs a 1 MiB range of a 48 MiB Glance image on a new connection every 20 ms from the host, each
answer checked; its gap is the longest request overlapping a restart. Every stall is printed with the
median and the worst over the restarts, next to the targets (planned <= 1 s, a crash <= 3 s to serve
again), and the successor's CPU seconds to get ready (what one restart costs a node). --json writes
every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nspawnkit import MiB, ROOT, Container, boot, endpoint_instance  # noqa: E402

READER = r"""
import mmap, os, sys, time, zlib, json
path, crcs = sys.argv[1], json.load(open(sys.argv[2]))
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
stop = "/var/tmp/gap-reader.stop"
slow, bad, errors, reads, i = [], 0, [], 0, 0
print("reading", flush=True)
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        got = os.preadv(fd, [buf], i << 20)
    except OSError as e:
        errors.append([t, e.errno])
        time.sleep(0.05)
        continue
    d = time.monotonic() - t
    reads += 1
    if d > 0.02:
        slow.append([t, d])
    if zlib.crc32(buf[:got]) != crcs[i]:
        bad += 1
    i = (i + 1) % len(crcs)
print(json.dumps({"slow": slow, "bad": bad, "errors": errors, "reads": reads}), flush=True)
"""

SIZE = 512 * MiB


def image() -> None:
    crcs = []
    with open(ROOT / "srv/images/gap", "wb") as f:
        for _ in range(SIZE // MiB):
            block = os.urandom(MiB)
            crcs.append(zlib.crc32(block))
            f.write(block)
    (ROOT / "var/tmp/gap-crcs.json").write_text(json.dumps(crcs))
    (ROOT / "var/tmp/gap-reader.py").write_text(READER)
    (ROOT / "var/tmp/gap-reader.stop").unlink(missing_ok=True)


def main_pid(c: Container, unit: str) -> str:
    return c.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()


def cpu_seconds(c: Container, pid: str) -> float:
    fields = c.run("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stalls(windows: list[tuple[float, float]], slow: list[list[float]]) -> list[float]:
    """For each window, the longest read (start, duration) that overlaps it (0 if none stalled)."""
    out = []
    for a, b in windows:
        out.append(max((d for t, d in slow if t < b and t + d > a), default=0.0))
    return out


def cycles(c: Container, unit: str, count: int, how: str) -> tuple[list[tuple[float, float]], list[float]]:
    """Restart or kill ``unit`` ``count`` times; each one's window (from the signal to serving again,
    as systemd saw it, plus a margin for the first answers) and the successor's CPU seconds at ready."""
    windows, cpu = [], []
    for _ in range(count):
        time.sleep(2.2 if how == "restart" else 3.0)
        before = main_pid(c, unit)
        t0 = time.monotonic()
        if how == "restart":
            c.run("systemctl", "restart", unit, timeout=120)
        else:
            c.run("systemctl", "kill", "-s", "KILL", unit)
            deadline = time.monotonic() + 60
            while main_pid(c, unit) in ("0", before) or \
                    c.run("systemctl", "is-active", unit, check=False).stdout.strip() != "active":
                if time.monotonic() > deadline:
                    raise SystemExit(f"{unit} did not come back after a SIGKILL:\n{c.journal()}")
                time.sleep(0.05)
        windows.append((t0, time.monotonic() + 0.5))
        cpu.append(cpu_seconds(c, main_pid(c, unit)))
    return windows, cpu


def fuse_rounds(c: Container, restarts: int, crashes: int) -> dict:
    import subprocess

    image()
    c.run("systemctl", "start", "imgfs.service")
    reader = subprocess.Popen(["nsenter", "-t", str(c.pid), "-m", "-u", "-i", "-n", "-p", "--", "python3",
                               "/var/tmp/gap-reader.py", "/var/lib/imgfs/mnt/images/gap", "/var/tmp/gap-crcs.json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    if reader.stdout.readline().strip() != "reading":
        raise SystemExit(f"the reader did not start: {reader.stderr.read() if reader.stderr else ''}")
    try:
        planned, planned_cpu = cycles(c, "imgfs.service", restarts, "restart")
        crashed, crashed_cpu = cycles(c, "imgfs.service", crashes, "kill")
        time.sleep(1.0)
    finally:
        (ROOT / "var/tmp/gap-reader.stop").write_text("")
        out, err = reader.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    log = c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
    c.run("systemctl", "stop", "imgfs.service")
    (ROOT / "srv/images/gap").unlink()
    return {"planned": stalls(planned, result["slow"]), "crash": stalls(crashed, result["slow"]),
            "planned_cpu": planned_cpu, "crash_cpu": crashed_cpu, "reads": result["reads"], "bad": result["bad"],
            "errors": result["errors"], "takeovers": log.count("took over the mount")}


def endpoint_rounds(c: Container, restarts: int, tmp: Path) -> dict | None:
    from tests.conftest import LAB_DIR
    from tests.imageapi import Api, token_of

    lab_json = LAB_DIR / "lab.json"
    if not lab_json.exists():
        print("no lab (tests/lab/up): skipping the endpoint client", file=sys.stderr)
        return None
    lab = json.loads(lab_json.read_text())
    glance = Api(lab["glance"]["endpoint"], token_of(lab, "imgfs"))
    data = os.urandom(48 * MiB)
    img = glance("POST", "/v2/images", json={"name": "imgfs-restart-bench", "disk_format": "raw",
                                            "container_format": "bare"}).json()
    try:
        glance("PUT", f"/v2/images/{img['id']}/file", data=data, headers={"Content-Type": "application/octet-stream"})
        api, path = endpoint_instance(c, lab, tmp, glance, img["id"])
        samples: list[list[float]] = []
        failures: list[str] = []
        stop = threading.Event()

        def client() -> None:
            i = 0
            while not stop.is_set():
                at = (i % 48) * MiB
                t = time.monotonic()
                try:
                    r = api("GET", path, headers={"Range": f"bytes={at}-{at + MiB - 1}", "Connection": "close"})
                    if r.status_code != 206 or r.content != data[at:at + MiB]:
                        failures.append(f"{r.status_code}, {len(r.content)} bytes")
                except Exception as e:  # noqa: BLE001 - a refused or reset connection is what this counts
                    failures.append(f"{type(e).__name__}: {e}"[:200])
                samples.append([t, time.monotonic() - t])
                i += 1
                time.sleep(0.02)

        worker = threading.Thread(target=client)
        worker.start()
        try:
            windows, cpu = cycles(c, "imgfs@ep.service", restarts, "restart")
            time.sleep(1.0)
        finally:
            stop.set()
            worker.join(60)
        c.run("systemctl", "stop", "imgfs@ep.service")
        return {"planned": stalls(windows, samples), "planned_cpu": cpu, "requests": len(samples),
                "failures": failures[:20], "failed": len(failures),
                "typical": statistics.median(d for _, d in samples)}
    finally:
        glance("DELETE", f"/v2/images/{img['id']}")


def row(name: str, values: list[float], target: float | None) -> str:
    if not values:
        return f"  {name:<38} (none)"
    med, worst = statistics.median(values), max(values)
    verdict = "" if target is None else ("PASS" if med <= target else "MISS")
    return (f"  {name:<38} median {med:6.3f} s   worst {worst:6.3f} s   "
            f"{'' if target is None else f'target <= {target:g} s  {verdict}'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--crashes", type=int, default=5)
    parser.add_argument("--no-endpoint", action="store_true", help="skip the Image API client (needs the lab)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    if (REPO_STATUS := Path(__file__).resolve().parent.parent / ".venv/pyfuse3-patch.status").exists() and \
            "patched" not in REPO_STATUS.read_text():
        print("stock pyfuse3 (patches/pyfuse3 not applied): a restart remounts; nothing to measure", file=sys.stderr)
        return 2
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="imgfs-restart-bench-"))
    c = boot(tmp / "console.log")
    try:
        fuse = fuse_rounds(c, args.restarts, args.crashes)
        endpoint = None if args.no_endpoint else endpoint_rounds(c, args.restarts, tmp)
    finally:
        c.stop()
    print(f"\nrestart gap under systemd 252 (nspawn), {os.cpu_count()} cores, kernel {os.uname().release}")
    print(f" sequential O_DIRECT reader of a {SIZE // MiB} MiB image (file store): {fuse['reads']} reads, "
          f"{fuse['bad']} with wrong bytes, {len(fuse['errors'])} errors, {fuse['takeovers']} takeovers")
    print(row(f"planned restart ({len(fuse['planned'])}x): longest read", fuse["planned"], 1.0))
    print(row(f"SIGKILL ({len(fuse['crash'])}x): longest read", fuse["crash"], 3.0))
    print(row("CPU to get ready after a restart", fuse["planned_cpu"], None))
    if endpoint is not None:
        print(f" Image API client, a 1 MiB range on a new connection every 20 ms: {endpoint['requests']} requests, "
              f"{endpoint['failed']} failed; typical {endpoint['typical'] * 1000:.0f} ms")
        print(row(f"planned restart ({len(endpoint['planned'])}x): longest request", endpoint["planned"], 1.0))
        print(row("CPU to get ready (Glance catalog)", endpoint["planned_cpu"], None))
        for f in endpoint["failures"][:5]:
            print(f"   failed: {f}")
    if args.json:
        args.json.write_text(json.dumps({"fuse": fuse, "endpoint": endpoint}, indent=1))
        print(f"numbers: {args.json}")
    wrong = fuse["bad"] or fuse["errors"] or (endpoint is not None and endpoint["failed"])
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
