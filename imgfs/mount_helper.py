"""``mount.imgfs``: the helper mount(8) runs for ``-t imgfs``, so an fstab line works::

    /etc/imgfs/imgfs.conf  /var/lib/imgfs/mnt  imgfs  ro,allow_other,_netdev  0 0

SOURCE is the config file, or several separated by commas (e.g.
``/etc/glance/glance-api.conf,/etc/imgfs/imgfs.conf``; later wins). It starts ``imgfs mount`` in the
background (its own session, log in /var/log/imgfs/), waits until the mount answers, and exits 0; on
failure it prints the daemon's last log lines and exits 32 (mount's "mount failure"). ``umount``
unmounts as for any filesystem: the daemon then detaches its Cinder volumes and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# Options mount(8) and systemd handle themselves, or that mean nothing to a read-only FUSE mount.
_IGNORED = {"ro", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "noatime",
            "relatime", "nodiratime", "nodev", "nosuid", "noexec", "exec", "dev", "suid", "async", "sync"}
EXIT_USAGE, EXIT_FAILURE = 1, 32
LOG_DIR = "/var/log/imgfs"


def _mounted(target: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def parse(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(config files, mountpoint, extra imgfs args) from mount(8)'s arguments."""
    positional, options = [], []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg == "-t":
            next(args, None)
        elif arg.startswith("-"):
            continue  # -s -f -n -v: sloppy, fake, no-mtab, verbose
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ValueError("usage: mount.imgfs CONFIG[,CONFIG...] MOUNTPOINT [-o options]")
    source, target = positional
    extra: list[str] = []
    for option in filter(None, options):
        if option == "rw":
            raise ValueError("imgfs is read-only: use the 'ro' option")
        if option == "allow_other":
            extra.append("--allow-other")
        elif option == "debug":
            extra.append("--debug")
        elif option in _IGNORED or option.startswith(("x-", "comment=")):
            continue
        else:
            raise ValueError(f"unknown mount option {option!r} (known: ro, allow_other, debug)")
    return source.split(","), os.path.abspath(target), extra


def main(argv: list[str] | None = None) -> int:
    try:
        configs, target, extra = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"mount.imgfs: {e}", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(LOG_DIR, exist_ok=True)
    log_path = os.path.join(LOG_DIR, target.strip("/").replace("/", "-") + ".log")
    command = [sys.executable, "-m", "imgfs", "mount", target, *extra]
    for config in configs:
        command += ["--config-file", config]
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _mounted(target):
            return 0
        if daemon.poll() is not None:
            with open(log_path, errors="replace") as f:
                tail = f.read().splitlines()[-3:]
            print(f"mount.imgfs: imgfs exited with {daemon.returncode}: " + " | ".join(tail), file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(0.1)
    print(f"mount.imgfs: {target} did not come up within 120 s; see {log_path}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
