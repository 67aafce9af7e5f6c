"""The nginx configuration of one fleet node, from its [fleet] section, checked with ``nginx -t``.

Two servers in one nginx (Debian's stock package; its own nginx.service is never touched):

- **local** (127.0.0.1:local_port): this node's imgfs asks here. ``hash $uri$http_x_imgfs_chunk
  consistent`` (ketama) picks each chunk's owner among the members, asked over mutual TLS; an owner
  that fails (connection refused, timeout, 502-504) is passed over for the next one on the ring, and
  imgfs reads from the origin if that fails too.
- **mesh** (mesh_listen, TLS with client certificates from the fleet's CA only): peers ask here. ``slice``
  cuts every request into chunk-aligned pieces, ``proxy_cache`` keeps them (key: path and slice range,
  never a credential), and ``proxy_cache_lock`` lets one request per piece through to this node's
  origin gateway while the others wait for the cached copy: one origin fetch per chunk for the fleet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from ..config import Config, FleetConfig, split_listen
from ..errors import ConfigError
from .gateway import new_secret

NGINX = "/usr/sbin/nginx"


@dataclass(frozen=True)
class Rendered:
    conf_path: str
    secret_created: bool
    checked: bool  # nginx -t passed (False: no nginx binary to check with)


def _server_line(member: str) -> str:
    # one failure marks an owner down for 10 s: the ring's next node takes its chunks meanwhile
    return f"        server {member} max_fails=1 fail_timeout=10s;"


def nginx_conf(fleet: FleetConfig, *, chunk_size: int, secret: str, worker_user: str | None = "www-data",
               workers: str = "auto") -> str:
    members = "\n".join(_server_line(m) for m in fleet.members)
    cache = fleet.cache_path
    timeout = f"{fleet.timeout:g}s"
    user = f"user {worker_user};\n" if worker_user else ""
    host, port = split_listen(fleet.mesh_listen)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if fleet.access_log:
        # what an operator asks of the mesh when the origin sends more than one copy: was the chunk in
        # the owner's cache, which owners were tried, how long each took. Never a header: the gateway's
        # secret travels in one.
        access = (f"log_format imgfs_mesh '$time_iso8601 $server_port $remote_addr $status $body_bytes_sent "
                  f"$request_time \"$uri\" range=$http_range slice=$slice_range cache=$upstream_cache_status "
                  f"upstream=$upstream_addr upstream_status=$upstream_status "
                  f"upstream_time=$upstream_response_time';\n"
                  f"    access_log {fleet.access_log} imgfs_mesh;")
    else:
        access = "# no access log unless [fleet] access_log: a line per chunk is more than a node needs\n" \
                 "    access_log off;"
    return f"""# Written by 'imgfs fleet render' from imgfs.conf's [fleet]: edit that, render again, then
# 'systemctl reload imgfs-mesh'. A members change remaps about 1/N of the chunks.
{user}worker_processes {workers};
pid {fleet.run_dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    {access}
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {cache}/tmp/client;
    proxy_temp_path {cache}/tmp/proxy;
    fastcgi_temp_path {cache}/tmp/fastcgi;
    uwsgi_temp_path {cache}/tmp/uwsgi;
    scgi_temp_path {cache}/tmp/scgi;
    proxy_cache_path {cache}/chunks levels=1:2 keys_zone=imgfs_mesh:32m max_size={fleet.cache_max_size_gb:g}g
                     inactive=7d use_temp_path=off;

    upstream imgfs_owners {{
        hash $uri$http_x_imgfs_chunk consistent;
{members}
        keepalive 64;
    }}

    upstream imgfs_gateway {{
        server 127.0.0.1:{fleet.gateway_port};
        keepalive 16;
    }}

    # this node's imgfs asks here
    server {{
        listen 127.0.0.1:{fleet.local_port};
        location /fleet/v1/ {{
            proxy_pass https://imgfs_owners;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {fleet.peer_name};
            proxy_set_header X-Imgfs-Gateway-Secret "";
            proxy_ssl_certificate {fleet.certfile};
            proxy_ssl_certificate_key {fleet.keyfile};
            proxy_ssl_trusted_certificate {fleet.cafile};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {fleet.peer_name};
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_connect_timeout {fleet.connect_timeout:g}s;
            proxy_read_timeout {timeout};
            proxy_send_timeout {timeout};
            proxy_buffering off;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 2;
            proxy_next_upstream_timeout {timeout};
        }}
        location / {{
            return 404;
        }}
    }}

    # peers ask here, with a certificate from the fleet's CA
    server {{
        listen {listen} ssl;
        ssl_certificate {fleet.certfile};
        ssl_certificate_key {fleet.keyfile};
        ssl_client_certificate {fleet.cafile};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:imgfs_mesh_tls:8m;
        location /fleet/v1/ {{
            slice {chunk_size};
            proxy_cache imgfs_mesh;
            proxy_cache_key $uri$slice_range;
            proxy_cache_valid 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout {timeout};
            proxy_cache_lock_age {timeout};
            proxy_set_header Range $slice_range;
            proxy_set_header X-Imgfs-Gateway-Secret "{secret}";
            proxy_set_header X-Imgfs-Chunk "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout {timeout};
            proxy_pass http://imgfs_gateway;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _write_private(path: str, text: str, mode: int) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".render-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def ensure_secret(path: str) -> tuple[str, bool]:
    """This node's gateway secret: read, or made (0600) if there is none yet."""
    try:
        with open(path) as f:
            secret = f.read().strip()
        if len(secret) >= 16:
            return secret, False
    except FileNotFoundError:
        pass
    secret = new_secret()
    _write_private(path, secret + "\n", 0o600)
    return secret, True


def render(config: Config, *, check: bool = True, worker_user: str | None = "www-data", workers: str = "auto") -> Rendered:
    fleet = config.fleet
    if fleet is None:
        raise ConfigError("[fleet] enabled = true is not set in the configuration: nothing to render")
    secret, created = ensure_secret(fleet.secret_file)
    for sub in ("chunks", "tmp"):
        os.makedirs(os.path.join(fleet.cache_path, sub), mode=0o700, exist_ok=True)
    os.makedirs(fleet.run_dir, mode=0o755, exist_ok=True)
    if worker_user:
        try:
            import pwd

            ids = pwd.getpwnam(worker_user)
        except KeyError:
            raise ConfigError(f"[fleet]: user {worker_user} (nginx's workers) does not exist; install Debian's nginx") from None
        for root, dirs, _files in os.walk(fleet.cache_path):
            for d in [root, *(os.path.join(root, d) for d in dirs)]:
                os.chown(d, ids.pw_uid, ids.pw_gid)
    conf = nginx_conf(fleet, chunk_size=config.options.chunk_size, secret=secret, worker_user=worker_user, workers=workers)
    path = os.path.join(fleet.nginx_dir, "nginx.conf")
    # the file holds the gateway secret: root's alone, like the key it names
    _write_private(path + ".new", conf, 0o600)
    checked = False
    nginx = shutil.which("nginx") or (NGINX if os.path.exists(NGINX) else None)
    if check and nginx:
        result = subprocess.run([nginx, "-t", "-q", "-c", path + ".new"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "emerg" in line or "error" in line] or result.stderr.splitlines()
            os.unlink(path + ".new")
            raise ConfigError(f"nginx -t refused the rendered configuration: {lines[0] if lines else 'no reason given'}")
        checked = True
    os.replace(path + ".new", path)
    return Rendered(path, created, checked)
