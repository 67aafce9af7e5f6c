#!/usr/bin/env python3
"""imgfs benchmark: imgfs vs s3fs-fuse vs rclone mount vs the local-file limit,
all against one s3rver (loopback) object.  Entry point: bench/run.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import metadata  # noqa: E402
import procs  # noqa: E402
from image import ensure_image, ensure_qcow2, sha256_file  # noqa: E402
from procs import BenchError, Interrupted, drop_caches, log  # noqa: E402
from s3server import BUCKET, S3RVER_VERSION, BackendMeter, S3rver, backend_ceiling, ensure_s3rver  # noqa: E402
from systems import IMGFS_BIN, REPO, Ctx, Floor, Imgfs, Local, Rclone, S3fs, System  # noqa: E402

STATE = REPO / ".bench"          # gitignored: node_modules, images, runs, results
ALL = ["local", "floor", "imgfs", "s3fs", "rclone"]
MiB = 1 << 20
GiB = 1 << 30

# key, label, unit, better ("hi"/"lo"), target
#   target: ("peer", x)  imgfs >= x * best peer (better "lo": imgfs <= x * best peer)
#           ("local", x) imgfs >= x * local-file value of the same row
#           ("floor", x) imgfs >= x * the floor row's value (better "lo": <=)
#           ("max", x)   imgfs <= x
# "daemon CPU" rows: user + system CPU seconds of the daemon process tree (every thread) during that
# row's reads, per GiB read (per 1000 reads for random 4K): the figure that carries to a busy node.
METRICS = [
    ("seq_cold_1M", "cold seq read, dd bs=1M", "MB/s", "hi", ("peer", 1.5)),
    ("cpu_cold_1M", "  daemon CPU s/GiB, cold seq 1M", "s/GiB", "lo", ("peer", 1.0)),
    ("seq_cold_4M", "cold seq read, dd bs=4M", "MB/s", "hi", ("peer", 1.5)),
    ("cold_backend_x", "  backend bytes/size, 1 cold dd", "x", "lo", None),
    ("cold_s3rver_cpu", "  s3rver CPU s during cold dd", "s", "lo", None),
    ("seq_warm_1M", "warm seq (own cache, pc dropped) 1M", "MB/s", "hi", ("floor", 0.8)),
    ("cpu_warm_1M", "  daemon CPU s/GiB, warm seq 1M", "s/GiB", "lo", ("floor", 1.3)),
    ("seq_warm_4M", "warm seq (own cache, pc dropped) 4M", "MB/s", "hi", ("local", 0.9)),
    ("cpu_warm_4M", "  daemon CPU s/GiB, warm seq 4M", "s/GiB", "lo", None),
    ("seq_warm_restart_1M", "warm seq after daemon restart, 1M", "MB/s", "hi", ("local", 0.9)),
    ("warm_backend_x", "  backend bytes/size, warm reads", "x", "lo", None),
    ("seq_reread_1M", "re-read (page cache hot), 1M", "MB/s", "hi", None),
    ("cpu_reread_1M", "  daemon CPU s/GiB, re-read 1M", "s/GiB", "lo", None),
    ("ttfb_ms", "TTFB cold (open + 4 KiB @0)", "ms", "lo", None),
    ("ttfb_backend_mib", "  backend MiB fetched for that 4 KiB", "MiB", "lo", None),
    ("rand_cold_iops", "random 4K cold (after TTFB), QD1", "IOPS", "hi", None),
    ("rand_cold_mbps", "random 4K cold (after TTFB), QD1", "MB/s", "hi", None),
    ("rand_cold_p99_ms", "random 4K cold, p99 latency", "ms", "lo", None),
    ("rand_cold_backend_mib", "  backend MiB for those cold 4K reads", "MiB", "lo", ("max", 128)),
    ("cpu_rand_cold", "  daemon CPU s per 1000 cold 4K reads", "s", "lo", None),
    ("rand_warm_iops", "random 4K warm (pc dropped), QD1", "IOPS", "hi", ("floor", 0.7)),
    ("cpu_rand_warm", "  daemon CPU s per 1000 warm 4K reads", "s", "lo", None),
    ("rand_warm_mbps", "random 4K warm (pc dropped), QD1", "MB/s", "hi", None),
    ("rand_warm_p99_ms", "random 4K warm, p99 latency", "ms", "lo", None),
    ("conc_wall_s", "N cold readers: wall time", "s", "lo", None),
    ("conc_agg_mbps", "N cold readers: aggregate", "MB/s", "hi", None),
    ("conc_backend_x", "N cold readers: backend bytes/size", "x", "lo", ("max", 1.02)),
    ("cpu_conc", "  daemon CPU s/GiB read, N cold readers", "s/GiB", "lo", None),
    ("rss_mib", "daemon peak RSS (VmHWM, tree)", "MiB", "lo", ("max", 256)),
    ("start_s", "mount start -> file visible (max)", "s", "lo", None),
    ("qemu_warm_s", "qemu-img convert qcow2->raw, own cache", "s", "lo", ("local", 1.5)),
    ("cpu_qemu_warm", "  daemon CPU s during that convert", "s", "lo", None),
    ("qemu_cold_s", "qemu-img convert qcow2->raw, cold", "s", "lo", None),
    ("qemu_cold_backend_x", "  backend bytes/qcow2 size, cold convert", "x", "lo", ("max", 1.05)),
    ("ls_first_s", "ls -l of 10,000 images, first", "s", "lo", ("max", 0.5)),
    ("ls_warm_s", "ls -l of 10,000 images, again", "s", "lo", ("max", 0.5)),
    ("stat_all_s", "stat of 10,000 images, one by one", "s", "lo", None),
    ("meta_start_s", "mount start -> 10,000 visible (file store)", "s", "lo", ("max", 0.5)),
]


# ---------------------------------------------------------------------------
# measuring one system
# ---------------------------------------------------------------------------

class Runner:
    def __init__(self, args, ctx: Ctx, srv: S3rver, sha: str):
        self.args, self.ctx, self.srv, self.sha = args, ctx, srv, sha
        self.size = ctx.size
        self.dd_timeout = max(120.0, self.size / 5e6)

    def seq(self, s: System, bs: str, what: str) -> dict:
        c0 = s.cpu_s()
        with BackendMeter(self.srv) as m:
            r = measure.dd(s.path(), bs, self.size, self.dd_timeout)
        r.update(backend_bytes=m.bytes, backend_x=m.bytes / self.size, s3rver_cpu_s=m.cpu_s,
                 cpu_per_gib=per(s, c0, self.size / GiB))
        s.sample_rss()
        log(f"  {s.name:14s} {what:24s} bs={bs}: {r['mbps']:8.1f} MB/s  "
            f"backend {r['backend_x']:.3f}x  s3rver cpu {m.cpu_s:.1f}s  daemon {cpu_text(r['cpu_per_gib'])} CPU-s/GiB")
        return r

    def rand(self, s: System, seed: int, what: str) -> dict:
        c0 = s.cpu_s()
        with BackendMeter(self.srv) as m:
            r = measure.random_reads(s.path(), self.ctx.local_image, self.size,
                                     self.args.random_ops, seed, self.args.random_max_s)
        r.update(backend_bytes=m.bytes, cpu_per_1000=per(s, c0, r["ops"] / 1000))
        s.sample_rss()
        log(f"  {s.name:14s} {what:24s}: {r['iops']:8.0f} IOPS, p99 {r['p99_ms']:.2f} ms, "
            f"{r['ops']} ops{' (time-capped)' if r['truncated'] else ''}, "
            f"backend {m.bytes / MiB:.1f} MiB, daemon {cpu_text(r['cpu_per_1000'])} CPU-s per 1000")
        return r

    def conc(self, s: System) -> dict:
        c0 = s.cpu_s()
        with BackendMeter(self.srv) as m:
            r = measure.concurrent(s.path(), self.args.readers, "1M", self.size,
                                   self.args.conc_timeout)
        r.update(backend_bytes=m.bytes, backend_x=m.bytes / self.size, s3rver_cpu_s=m.cpu_s,
                 cpu_per_gib=per(s, c0, self.args.readers * self.size / GiB))
        s.sample_rss()
        log(f"  {s.name:14s} {self.args.readers} concurrent cold readers: wall {r['wall_s']:.1f}s, "
            f"{r['agg_mbps']:.0f} MB/s aggregate, backend {r['backend_x']:.3f}x")
        return r

    def verify(self, s: System, what: str) -> dict:
        r = measure.verify(s.path(), self.size, self.sha)
        log(f"  {s.name:14s} sha256 of full read ({what}) OK")
        return {"what": what, **r}

    def rep(self, s: System, bs: str, what: str, prep) -> dict:
        """--repeat samples of one dd row; prep() runs before each sample.
        Summary: median MB/s, worst (max) backend ratio; all samples kept."""
        samples = []
        for _ in range(self.args.repeat):
            if prep is not None:
                prep()
            samples.append(self.seq(s, bs, what))
        mb = sorted(x["mbps"] for x in samples)
        cpu = sorted(x["s3rver_cpu_s"] for x in samples)
        daemon = sorted(x["cpu_per_gib"] for x in samples if x["cpu_per_gib"] is not None)
        return {"mbps": mb[len(mb) // 2], "mbps_min": mb[0], "mbps_max": mb[-1],
                "cpu_per_gib": daemon[len(daemon) // 2] if daemon else None,
                "backend_x": max(x["backend_x"] for x in samples),
                "s3rver_cpu_s": cpu[len(cpu) // 2], "samples": samples}

    def ttfb_rep(self, s: System) -> dict:
        samples = []
        for _ in range(self.args.repeat):
            s.cold()
            with BackendMeter(self.srv) as mt:
                r = measure.ttfb(s.path(), self.ctx.local_image)
            r["backend_bytes"] = mt.bytes
            samples.append(r)
            log(f"  {s.name:14s} TTFB cold: {r['ttfb_ms']:.2f} ms, backend {mt.bytes / MiB:.1f} MiB")
        ms = sorted(x["ttfb_ms"] for x in samples)
        return {"ttfb_ms": ms[len(ms) // 2], "backend_bytes": max(x["backend_bytes"] for x in samples),
                "samples": samples}

    def qemu(self, s: System, what: str) -> dict | None:
        """`qemu-img convert -O raw` of the qcow2 through this system (output on tmpfs), checked by
        the sha256 of the raw disk it must give."""
        src = s.path_of(self.ctx.qcow2_key) if self.ctx.qcow2_key else None
        if src is None:
            return None
        out = Path(f"/dev/shm/imgfs-bench-qemu-{os.getpid()}.raw")
        c0 = s.cpu_s()
        with BackendMeter(self.srv) as m:
            t0 = time.monotonic()
            r = subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(out)], capture_output=True,
                               text=True, timeout=600)
            dt = time.monotonic() - t0
        cpu = None if c0 is None or s.cpu_s() is None else s.cpu_s() - c0
        try:
            if r.returncode != 0:
                raise BenchError(f"qemu-img convert of {src} failed: {r.stderr.strip()}")
            got = sha256_file(out)
        finally:
            out.unlink(missing_ok=True)
        if got != self.qcow2_raw_sha:
            raise BenchError(f"BYTE MISMATCH: qemu-img convert of {src} gave a disk with sha256 {got}, "
                             f"expected {self.qcow2_raw_sha}")
        log(f"  {s.name:14s} qemu-img convert ({what}): {dt:.2f}s, backend {m.bytes / MiB:.1f} MiB "
            f"({m.bytes / self.ctx.qcow2_size:.3f}x of the qcow2), daemon CPU {cpu_text(cpu)} s; raw sha256 OK")
        return {"seconds": dt, "backend_bytes": m.bytes, "backend_x": m.bytes / self.ctx.qcow2_size, "cpu_s": cpu}

    # -- per kind ---------------------------------------------------------
    def local(self, s: Local) -> tuple[dict, dict]:
        d = {}
        s.start()
        d["cold_1M"] = self.rep(s, "1M", "cold (disk)", s.cold)
        d["cold_4M"] = self.rep(s, "4M", "cold (disk)", s.cold)
        # for the local file "warm" is the same thing as cold: the disk, page cache dropped
        d["warm_1M"] = self.rep(s, "1M", "warm (= disk)", s.cold)
        d["warm_4M"] = self.rep(s, "4M", "warm (= disk)", s.cold)
        d["reread_1M"] = self.rep(s, "1M", "re-read (pc hot)", None)
        d["ttfb"] = self.ttfb_rep(s)
        s.cold()
        d["rand_cold"] = self.rand(s, 3, "random 4K (disk)")
        s.cold()
        d["rand_warm"] = self.rand(s, 2, "random 4K (disk)")
        s.cold()
        d["conc"] = self.conc(s)
        s.cold()
        d["qemu"] = self.qemu(s, "local qcow2, pc dropped")
        m = dict(seq_cold_1M=d["cold_1M"]["mbps"], seq_cold_4M=d["cold_4M"]["mbps"],
                 seq_warm_1M=d["warm_1M"]["mbps"], seq_warm_4M=d["warm_4M"]["mbps"],
                 seq_reread_1M=d["reread_1M"]["mbps"], ttfb_ms=d["ttfb"]["ttfb_ms"],
                 rand_cold_iops=d["rand_cold"]["iops"], rand_cold_mbps=d["rand_cold"]["mbps"],
                 rand_cold_p99_ms=d["rand_cold"]["p99_ms"],
                 rand_warm_iops=d["rand_warm"]["iops"], rand_warm_mbps=d["rand_warm"]["mbps"],
                 rand_warm_p99_ms=d["rand_warm"]["p99_ms"],
                 conc_wall_s=d["conc"]["wall_s"], conc_agg_mbps=d["conc"]["agg_mbps"])
        if d["qemu"]:
            m.update(qemu_warm_s=d["qemu"]["seconds"], qemu_cold_s=d["qemu"]["seconds"])
        return m, d

    def floor(self, s: System) -> tuple[dict, dict]:
        """The minimal pyfuse3 server over the local copy: the rows that need no backend."""
        d = {}
        s.setup()
        s.start()
        d["warm_1M"] = self.rep(s, "1M", "source pc dropped", s.drop)
        d["warm_4M"] = self.rep(s, "4M", "source pc dropped", s.drop)
        d["reread_1M"] = self.rep(s, "1M", "re-read (pc hot)", None)
        d["verify_seq"] = self.verify(s, "floor")
        s.drop()
        d["rand_warm"] = self.rand(s, 2, "random 4K (pc dropped)")
        s.stop()
        d["start_s"] = s.start_s
        m = dict(seq_warm_1M=d["warm_1M"]["mbps"], seq_warm_4M=d["warm_4M"]["mbps"],
                 cpu_warm_1M=d["warm_1M"]["cpu_per_gib"], cpu_warm_4M=d["warm_4M"]["cpu_per_gib"],
                 seq_reread_1M=d["reread_1M"]["mbps"], cpu_reread_1M=d["reread_1M"]["cpu_per_gib"],
                 rand_warm_iops=d["rand_warm"]["iops"], rand_warm_mbps=d["rand_warm"]["mbps"],
                 rand_warm_p99_ms=d["rand_warm"]["p99_ms"], cpu_rand_warm=d["rand_warm"]["cpu_per_1000"],
                 rss_mib=s.hwm_kib / 1024, start_s=max(s.start_s))
        return m, d

    def fuse(self, s: System) -> tuple[dict, dict]:
        d = {}
        s.setup()
        d["cold_1M"] = self.rep(s, "1M", "cold", s.cold)
        d["warm_1M"] = self.rep(s, "1M", "warm (pc dropped)", s.drop)
        d["warm_4M"] = self.rep(s, "4M", "warm (pc dropped)", s.drop)
        d["reread_1M"] = self.rep(s, "1M", "re-read (pc hot)", None)
        d["verify_seq"] = self.verify(s, "after cold sequential fill")
        d["warm_restart_1M"] = self.rep(s, "1M", "warm after restart", s.warm_restart)
        s.drop()
        d["rand_warm"] = self.rand(s, 2, "random 4K warm")
        d["cold_4M"] = self.rep(s, "4M", "cold", s.cold)
        d["ttfb"] = self.ttfb_rep(s)        # ends on a cold daemon that read 4 KiB @0
        d["rand_cold"] = self.rand(s, 3, "random 4K cold")
        s.cold()
        d["conc"] = self.conc(s)
        s.drop()
        d["verify_conc"] = self.verify(s, f"after {self.args.readers}-reader cold fill")
        s.cold()
        d["qemu_cold"] = self.qemu(s, "cold")
        s.drop()
        d["qemu_warm"] = self.qemu(s, "own cache, pc dropped")
        s.stop()
        d["read_ahead_kb"] = s.read_ahead_kb
        d["exit_codes"] = s.exit_codes
        d["start_s"] = s.start_s
        warm_x = max(d[k]["backend_x"] for k in ("warm_1M", "warm_4M", "warm_restart_1M"))
        m = dict(seq_cold_1M=d["cold_1M"]["mbps"], seq_cold_4M=d["cold_4M"]["mbps"],
                 cold_backend_x=d["cold_1M"]["backend_x"],
                 cold_s3rver_cpu=d["cold_1M"]["s3rver_cpu_s"],
                 seq_warm_1M=d["warm_1M"]["mbps"], seq_warm_4M=d["warm_4M"]["mbps"],
                 seq_warm_restart_1M=d["warm_restart_1M"]["mbps"], warm_backend_x=warm_x,
                 seq_reread_1M=d["reread_1M"]["mbps"], ttfb_ms=d["ttfb"]["ttfb_ms"],
                 ttfb_backend_mib=d["ttfb"]["backend_bytes"] / MiB,
                 rand_cold_iops=d["rand_cold"]["iops"], rand_cold_mbps=d["rand_cold"]["mbps"],
                 rand_cold_p99_ms=d["rand_cold"]["p99_ms"],
                 rand_cold_backend_mib=d["rand_cold"]["backend_bytes"] / MiB,
                 rand_warm_iops=d["rand_warm"]["iops"], rand_warm_mbps=d["rand_warm"]["mbps"],
                 rand_warm_p99_ms=d["rand_warm"]["p99_ms"],
                 conc_wall_s=d["conc"]["wall_s"], conc_agg_mbps=d["conc"]["agg_mbps"],
                 conc_backend_x=d["conc"]["backend_x"], rss_mib=s.hwm_kib / 1024,
                 start_s=max(s.start_s),
                 cpu_cold_1M=d["cold_1M"]["cpu_per_gib"], cpu_warm_1M=d["warm_1M"]["cpu_per_gib"],
                 cpu_warm_4M=d["warm_4M"]["cpu_per_gib"], cpu_reread_1M=d["reread_1M"]["cpu_per_gib"],
                 cpu_rand_cold=d["rand_cold"]["cpu_per_1000"], cpu_rand_warm=d["rand_warm"]["cpu_per_1000"],
                 cpu_conc=d["conc"]["cpu_per_gib"])
        if d["qemu_cold"] and d["qemu_warm"]:
            m.update(qemu_cold_s=d["qemu_cold"]["seconds"], qemu_cold_backend_x=d["qemu_cold"]["backend_x"],
                     qemu_warm_s=d["qemu_warm"]["seconds"], cpu_qemu_warm=d["qemu_warm"]["cpu_s"])
        return m, d

    def cold_variant(self, s: System) -> tuple[dict, dict]:
        d = {}
        s.setup()
        d["cold_1M"] = self.rep(s, "1M", "cold", s.cold)
        d["cold_4M"] = self.rep(s, "4M", "cold", s.cold)
        s.stop()
        d["read_ahead_kb"] = s.read_ahead_kb
        d["exit_codes"] = s.exit_codes
        m = {"seq_cold_1M": d["cold_1M"]["mbps"], "seq_cold_4M": d["cold_4M"]["mbps"],
             "cold_backend_x": d["cold_1M"]["backend_x"], "rss_mib": s.hwm_kib / 1024,
             "cpu_cold_1M": d["cold_1M"]["cpu_per_gib"]}
        return m, d


def per(s: System, before: float | None, units: float) -> float | None:
    after = s.cpu_s()
    if before is None or after is None or units <= 0:
        return None
    return (after - before) / units


def cpu_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------

def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit in ("x",):
        return f"{v:.3f}"
    if unit in ("ms", "s"):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def ratio(r) -> str:
    if r is None:
        return "-"
    if r < 0.1:
        return f"{r:.2g}x"
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def build_table(results: dict, columns: list[str]) -> tuple[str, list[dict]]:
    cols = [c for c in ALL if c in columns]
    peers = [c for c in ("s3fs", "rclone") if c in cols]
    rows_json = []
    W = 38
    head = (f"{'metric':{W}s} {'unit':5s} " + " ".join(f"{c:>14s}" for c in cols)
            + f" {'imgfs/best':>10s} {'imgfs/local':>11s} {'imgfs/floor':>11s}  target")
    lines = [head, "-" * len(head)]
    for key, label, unit, better, target in METRICS:
        label = label.replace("N cold", f"{results['params']['readers']} cold")
        vals, notes = {}, {}
        for c in cols:
            sysres = results["systems"].get(c, {})
            v = sysres.get("metrics", {}).get(key)
            note = sysres.get("best_variant", {}).get(key)
            vals[c], notes[c] = v, note
        cells = []
        for c in cols:
            v = vals[c]
            if v is None and results["systems"].get(c, {}).get("error"):
                cells.append("ERR")
            else:
                cell = fmt(v, unit)
                if notes[c]:
                    cell += f" [{notes[c]}]"
                cells.append(cell)
        peer_vals = [vals[p] for p in peers if isinstance(vals.get(p), (int, float))]
        best = None
        if peer_vals:
            best = max(peer_vals) if better == "hi" else min(peer_vals)
        im = vals.get("imgfs")
        lo = vals.get("local")
        fl = vals.get("floor")
        # informational rows get no ratio, except the daemon-CPU rows, whose ratios are the point
        informational = label.startswith("  ") and unit not in ("s/GiB",) and not key.startswith("cpu_")
        r_peer = im / best if (isinstance(im, (int, float)) and best
                               and not informational) else None
        r_local = im / lo if (isinstance(im, (int, float)) and isinstance(lo, (int, float))
                              and lo and not informational) else None
        r_floor = im / fl if (isinstance(im, (int, float)) and isinstance(fl, (int, float))
                              and fl and not informational) else None
        tgt, status = "", None
        cmp, word = ((lambda r, x: r >= x), ">=") if better == "hi" else ((lambda r, x: r <= x), "<=")
        if target:
            kind, x = target
            if kind == "peer":
                tgt = f"{word} {x}x best peer"
                status = cmp(r_peer, x) if r_peer is not None else None
            elif kind == "local":
                tgt = f"{word} {x:.0%} of local"
                status = cmp(r_local, x) if r_local is not None else None
            elif kind == "floor":
                tgt = f"{word} {x}x floor"
                status = cmp(r_floor, x) if r_floor is not None else None
            elif kind == "max":
                tgt = f"<= {x}{'' if unit == 'x' else ' ' + unit}"
                status = im <= x if isinstance(im, (int, float)) else None
            tgt += {True: "  PASS", False: "  MISS", None: "  n/a"}[status]
        lines.append(f"{label:{W}s} {unit:5s} " + " ".join(f"{c:>14s}" for c in cells)
                     + f" {ratio(r_peer):>10s} {ratio(r_local):>11s} {ratio(r_floor):>11s}  {tgt}")
        rows_json.append({"key": key, "label": label, "unit": unit, "better": better,
                          "values": vals, "variants": notes, "best_peer": best,
                          "imgfs_over_best_peer": r_peer, "imgfs_over_local": r_local, "imgfs_over_floor": r_floor,
                          "target": tgt.strip(), "target_met": status})
    ver = []
    for c in cols:
        sysres = results["systems"].get(c, {})
        if c == "local":
            ver.append("source")
        elif sysres.get("error"):
            ver.append("ERR")
        else:
            ver.append("OK" if sysres.get("verified") else "-")
    lines.append(f"{'sha256 of full reads vs source':{W}s} {'':5s} "
                 + " ".join(f"{v:>14s}" for v in ver))
    return "\n".join(lines), rows_json


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--only", default=",".join(ALL),
                    help=f"comma list of systems (default {','.join(ALL)})")
    ap.add_argument("--readers", type=int, default=20, help="concurrent cold readers (20)")
    ap.add_argument("--keep", action="store_true",
                    help="at the end keep s3rver and the mounts up until Ctrl-C / SIGTERM")
    ap.add_argument("--imgfs-conf-extra", action="append", default=[], metavar="LINE",
                    help="extra option line(s) for the [imgfs] section; repeatable, "
                         "'\\n' separates lines")
    ap.add_argument("--image-kind", choices=["ext4", "random"], default="ext4",
                    help="ext4 image filled with random files (default) or raw random bytes")
    ap.add_argument("--peer-read-ahead-kb", type=int, default=None,
                    help="read_ahead_kb for the s3fs/rclone mounts (default: the value imgfs "
                         "set on its mount; 16384 if imgfs is not run)")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the peers' alternative configs for the cold rows "
                         "(s3fs without use_cache, rclone --vfs-cache-mode off)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="samples per sequential dd row and TTFB; the median is reported (3)")
    ap.add_argument("--random-ops", type=int, default=2000)
    ap.add_argument("--random-max-s", type=float, default=20.0,
                    help="time cap per random-read run (IOPS from completed ops)")
    ap.add_argument("--conc-timeout", type=float, default=420.0)
    ap.add_argument("--s3-data-dir", default=None,
                    help="s3rver data dir (default: a fresh dir on tmpfs /dev/shm)")
    ap.add_argument("--json", default=None, help="results JSON path")
    ap.add_argument("--no-qemu", action="store_true",
                    help="skip the qemu-img convert rows (a compressed qcow2 of a 256 MiB ext4 disk)")
    ap.add_argument("--no-metadata", action="store_true",
                    help="skip the metadata rows (ls -l / stat of 10,000 images in a file store)")
    a = ap.parse_args(argv)
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.only if x not in ALL]
    if bad:
        ap.error(f"unknown system(s) {bad}; choose from {ALL}")
    a.imgfs_conf_extra = [ln for x in a.imgfs_conf_extra for ln in x.replace("\\n", "\n").split("\n")
                          if ln.strip()]
    return a


def preflight(args) -> None:
    if os.geteuid() != 0:
        raise BenchError("must run as root (drop_caches, read_ahead_kb, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse missing")
    need = ["dd", "curl", "node", "npm", "fusermount3", "mkfs.ext4", "e2fsck"]
    if "s3fs" in args.only:
        need.append("s3fs")
    if "rclone" in args.only:
        need.append("rclone")
    missing = [t for t in need if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing tools: {missing} (apt-get install s3fs rclone fuse3 "
                         f"nodejs npm curl e2fsprogs)")
    ours = [m for m in open("/proc/self/mountinfo").read().splitlines()
            if str(STATE / "runs") in m]
    if ours:
        raise BenchError("stale benchmark mounts exist:\n" + "\n".join(ours))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    procs.install_signal_handlers()
    t_start = time.monotonic()
    ts = time.strftime("%Y%m%d-%H%M%S")
    run_dir = STATE / "runs" / ts
    log_dir = run_dir / "logs"
    s3_dir = Path(args.s3_data_dir) if args.s3_data_dir else Path(f"/dev/shm/imgfs-bench-{ts}")
    json_path = Path(args.json) if args.json else STATE / "results" / f"bench-{ts}.json"
    results = {"params": {"size_mib": args.size_mib, "readers": args.readers,
                          "only": args.only, "image_kind": args.image_kind,
                          "random_ops": args.random_ops, "repeat": args.repeat, "random_max_s": args.random_max_s,
                          "imgfs_conf_extra": args.imgfs_conf_extra},
               "env": {"host": socket.gethostname(), "kernel": platform.release(),
                       "nproc": os.cpu_count(), "loadavg_start": procs.loadavg(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "systems": {}, "failures": []}
    failures: list[str] = results["failures"]
    srv = None
    systems: list[System] = []
    rc = 0
    try:
        preflight(args)
        log(f"loadavg at start: {results['env']['loadavg_start']}")
        script = ensure_s3rver(STATE)
        img, sha = ensure_image(STATE / "images", args.size_mib, args.image_kind)
        size = img.stat().st_size
        results["env"]["image"] = {"path": str(img), "sha256": sha, "bytes": size,
                                   "kind": args.image_kind}
        s3_dir.mkdir(parents=True, exist_ok=False)
        srv = S3rver(script, s3_dir, log_dir / "s3rver.log")
        srv.start()
        key = str(uuid.uuid4())
        log(f"s3rver pid {srv.pid} on {srv.endpoint}, data in {s3_dir}; uploading {img.name} "
            f"as {BUCKET}/{key}")
        up_s = srv.upload(img, key)
        log(f"uploaded {size / MiB:.0f} MiB in {up_s:.1f}s")
        drop_caches()
        ceil1, check1 = backend_ceiling(srv, key, size, 1)
        ceil4, check4 = backend_ceiling(srv, key, size, 4)
        log(f"backend ceiling (curl to /dev/null): 1 stream {ceil1:.0f} MB/s, "
            f"4 ranged streams {ceil4:.0f} MB/s; backend-bytes method check: "
            f"{check1:.5f}x / {check4:.5f}x of the object size")
        results["env"].update(s3rver=f"s3rver {S3RVER_VERSION} (node "
                                     f"{os.popen('node -v').read().strip()}), data on "
                                     f"{'tmpfs' if str(s3_dir).startswith('/dev/shm') else s3_dir}",
                              key=key, upload_s=up_s, backend_ceiling_1_mbps=ceil1,
                              backend_ceiling_4_mbps=ceil4, method_check_curl_1_x=check1,
                              method_check_curl_4_x=check4)
        ctx = Ctx(run_dir=run_dir, log_dir=log_dir, endpoint=srv.endpoint, bucket=BUCKET,
                  key=key, size=size, local_image=img,
                  peer_read_ahead_kb=args.peer_read_ahead_kb or 16384,
                  imgfs_conf_extra=args.imgfs_conf_extra)
        if not args.no_qemu:
            qcow2, _raw, raw_sha = ensure_qcow2(STATE / "images")
            ctx.qcow2_key, ctx.qcow2_local, ctx.qcow2_size = str(uuid.uuid4()), qcow2, qcow2.stat().st_size
            srv.upload(qcow2, ctx.qcow2_key)
            log(f"uploaded {qcow2.name} ({ctx.qcow2_size / MiB:.0f} MiB) as {BUCKET}/{ctx.qcow2_key}")
        runner = Runner(args, ctx, srv, sha)
        runner.qcow2_raw_sha = raw_sha if not args.no_qemu else None

        plan: list[tuple[str, System, str]] = []
        if "local" in args.only:
            plan.append(("local", Local(ctx), "local"))
        if "imgfs" in args.only:
            plan.append(("imgfs", Imgfs(ctx), "fuse"))
        if "floor" in args.only:  # after imgfs: it takes imgfs's read_ahead_kb, as the peers do
            plan.append(("floor", Floor(ctx), "floor"))
        if "s3fs" in args.only:
            plan.append(("s3fs", S3fs(ctx), "fuse"))
            if not args.no_variants:
                plan.append(("s3fs", S3fs(ctx, "nocache"), "variant"))
        if "rclone" in args.only:
            plan.append(("rclone", Rclone(ctx), "fuse"))
            if not args.no_variants:
                plan.append(("rclone", Rclone(ctx, "off"), "variant"))

        for col, s, kind in plan:
            if kind not in ("local",) and col != "imgfs" and args.peer_read_ahead_kb is None:
                imgres = results["systems"].get("imgfs", {})
                ra = imgres.get("read_ahead_kb")
                ctx.peer_read_ahead_kb = ra if ra else 16384
            systems.append(s)
            entry = results["systems"].setdefault(col, {"variants": {}, "best_variant": {}})
            log(f"=== {s.name}  (loadavg {procs.loadavg()})")
            t0 = time.monotonic()
            try:
                if kind == "local":
                    m, d = runner.local(s)
                elif kind == "floor":
                    m, d = runner.floor(s)
                elif kind == "fuse":
                    m, d = runner.fuse(s)
                else:
                    m, d = runner.cold_variant(s)
            except BenchError as e:
                msg = f"{s.name}: {e}"
                log(f"FAILED {msg}")
                failures.append(msg)
                entry.setdefault("errors", []).append(str(e))
                if kind != "variant":
                    entry["error"] = str(e)
                try:
                    s.stop()
                except BenchError as e2:
                    failures.append(f"{s.name} stop: {e2}")
                continue
            finally:
                if s.is_fuse and (not args.keep or kind == "variant"):
                    try:
                        s.teardown(keep_cache=False)
                    except BenchError as e3:
                        failures.append(f"{s.name} teardown: {e3}")
            dt = time.monotonic() - t0
            info = {"describe": s.describe(), "read_ahead_kb": s.read_ahead_kb,
                    "metrics": m, "details": d, "seconds": dt, "loadavg_end": procs.loadavg()}
            if kind == "variant":
                entry["variants"][s.variant] = info
                for k in ("seq_cold_1M", "seq_cold_4M"):
                    if k in m and m[k] > entry.setdefault("metrics", {}).get(k, 0):
                        entry["metrics"][k] = m[k]
                        entry["best_variant"][k] = s.variant
                        if k == "seq_cold_1M":  # the CPU of the configuration whose speed is shown
                            entry["metrics"]["cpu_cold_1M"] = m.get("cpu_cold_1M")
                            entry["best_variant"]["cpu_cold_1M"] = s.variant
            else:
                entry.update(info)
                entry["verified"] = kind in ("fuse", "floor")
                if s.exit_codes and any(c not in (0, None) for c in s.exit_codes):
                    entry["nonzero_exit_codes"] = s.exit_codes
            log(f"=== {s.name} done in {dt:.0f}s")

        if not args.no_metadata and "imgfs" in args.only:
            log(f"=== metadata: {metadata.COUNT} images (loadavg {procs.loadavg()})")
            try:
                meta = metadata.measure(run_dir / "metadata", log_dir)
                for col, vals in meta.items():
                    entry = results["systems"].setdefault(col, {"variants": {}, "best_variant": {}})
                    entry.setdefault("metrics", {}).update(
                        {k: v for k, v in vals.items() if k in ("ls_first_s", "ls_warm_s", "stat_all_s")})
                    if "start_s" in vals:
                        entry["metrics"]["meta_start_s"] = vals["start_s"]
                    entry["metadata"] = vals
            except BenchError as e:
                failures.append(f"metadata: {e}")
                log(f"FAILED metadata: {e}")
        results["env"]["loadavg_end"] = procs.loadavg()
        results["env"]["seconds"] = time.monotonic() - t_start
        results["env"]["peer_read_ahead_kb"] = ctx.peer_read_ahead_kb
        table, rows = build_table(results, args.only)
        results["table"] = rows
        print_report(results, table, args, ctx)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nresults JSON: {json_path}\nlogs: {log_dir}")
        if failures:
            print("\nFAILURES:", file=sys.stderr)
            for f in failures:
                print(f"  - {f}", file=sys.stderr)
            rc = 1
        if args.keep:
            keep_up(systems, srv)
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({e.__class__.__name__} {e}); cleaning up")
        rc = 130
    except BenchError as e:
        log(f"FATAL: {e}")
        rc = 2
    except Exception:
        traceback.print_exc()
        rc = 3
    finally:
        # block further SIGTERM/SIGINT while we clean up
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.cleanup()
        for s in systems:
            if s.is_fuse and not args.keep:
                shutil.rmtree(s.base, ignore_errors=True)
        if s3_dir.exists() and not args.s3_data_dir:
            shutil.rmtree(s3_dir, ignore_errors=True)
        left = procs.running()
        if left:
            log(f"WARNING: still running: {left}")
    return rc


def keep_up(systems: list[System], srv: S3rver) -> None:
    print(f"\n--keep: s3rver pid {srv.pid} at {srv.endpoint}", flush=True)
    for s in systems:
        if not s.is_fuse or s.variant != "main":
            continue
        try:
            if s.proc is None:
                s.start()
            print(f"  {s.name}: pid {s.proc.pid}, file {s.path()}", flush=True)
        except BenchError as e:
            print(f"  {s.name}: could not remount: {e}", flush=True)
    print(f"Press Ctrl-C (or kill -TERM {os.getpid()}) to stop everything.", flush=True)
    try:
        while True:
            signal.pause()
    except (KeyboardInterrupt, Interrupted):
        log("--keep: stopping")


def print_report(results: dict, table: str, args, ctx: Ctx) -> None:
    env = results["env"]
    out = []
    out.append("")
    out.append(f"imgfs benchmark  {env['started']}  host {env['host']}  kernel {env['kernel']}  "
               f"{env['nproc']} CPUs")
    out.append(f"loadavg at start: {env['loadavg_start']}   at end: {env['loadavg_end']}   "
               f"run time {env['seconds'] / 60:.1f} min")
    im = env["image"]
    out.append(f"image: {im['kind']} {im['bytes'] / MiB:.0f} MiB  sha256 {im['sha256'][:16]}...  "
               f"object {BUCKET}/{env['key']}")
    out.append(f"backend: {env['s3rver']}; ceiling with curl -> /dev/null: "
               f"1 stream {env['backend_ceiling_1_mbps']:.0f} MB/s, 4 ranged streams "
               f"{env['backend_ceiling_4_mbps']:.0f} MB/s")
    out.append(f"backend bytes = s3rver /proc/PID/io wchar delta minus its log growth; method "
               f"check with curl GETs of the object: {env['method_check_curl_1_x']:.5f}x (1 GET), "
               f"{env['method_check_curl_4_x']:.5f}x (4 ranged GETs)")
    ras = {c: results["systems"].get(c, {}).get("read_ahead_kb") for c in ALL
           if c in results["systems"]}
    src = ("imgfs's value" if args.peer_read_ahead_kb is None and "imgfs" in ras
           else ("--peer-read-ahead-kb" if args.peer_read_ahead_kb else "default 16384"))
    out.append("read_ahead_kb: " + ", ".join(f"{c}={v}" for c, v in ras.items())
               + f"  (peers set to {src}; imgfs sets its own; local = the disk's)")
    out.append(f"MB/s = 10^6 B/s, wall clock around the whole dd, median of {args.repeat} "
               f"(min/max in JSON); cold = cache emptied + daemon restarted + drop_caches; "
               f"warm = own cache full + drop_caches; pc = page cache")
    out.append("")
    out.append(table)
    out.append("")
    out.append("[variant] = the cold value comes from that alternative peer config "
               "(cold rows show the best of main and variant). Peer flags:")
    for c in ("s3fs", "rclone"):
        sysres = results["systems"].get(c)
        if not sysres:
            continue
        if sysres.get("describe"):
            out.append(f"  {c} (main): {sysres['describe']}")
        for v, info in sysres.get("variants", {}).items():
            out.append(f"  {c} [{v}]: {info['describe']}")
    if "imgfs" in results["systems"] and results["systems"]["imgfs"].get("describe"):
        out.append(f"  imgfs: {results['systems']['imgfs']['describe']}")
    for c, sysres in results["systems"].items():
        if c == "imgfs" and sysres.get("nonzero_exit_codes"):
            out.append(f"  NOTE: {c} exited with codes {sysres['nonzero_exit_codes']} on SIGTERM")
        if sysres.get("error"):
            out.append(f"  ERROR {c}: {sysres['error'].splitlines()[0]}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
