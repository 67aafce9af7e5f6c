"""Brings the imgfs lab up: Ceph (mon, mgr, 1 OSD, RGW), MariaDB, RabbitMQ, Keystone, Cinder, Glance.

Run by tests/lab/up with the lab venv's python (it needs keystoneclient/cinderclient from there).
Every daemon runs as a plain process on 127.0.0.1, in its own session (setsid), with cwd and data in
the lab dir; its PID and start time are recorded in <data>/pids/<name>.pid for tests/lab/down.
Every step checks before it acts, so `up` on a healthy lab only verifies health and rewrites lab.json.

To add a service: add its port in PORTS, a step that writes its config, runs its one-time setup
behind a marker file, calls `self.start(...)` and waits for health (see the Glance steps); call it
from `up()`; add its name to STOP_STAGES in tests/lab/down; describe it in lab.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LAB = Path(os.environ.get('IMGFS_LAB_DIR') or REPO / '.lab').resolve()
DATA = LAB / 'data'
VENV = LAB / 'venv'
HOST = '127.0.0.1'
PORT_BASE = int(os.environ.get('IMGFS_LAB_PORT_BASE', '26100'))
# One private block below Linux's ephemeral range (32768+), so outgoing connections never take them.
PORTS = {
    'keystone': PORT_BASE + 0,
    'cinder': PORT_BASE + 1,
    'glance': PORT_BASE + 2,
    'rgw': PORT_BASE + 3,
    'imgfs_api': PORT_BASE + 4,      # not a lab daemon: where a test's imgfs serves its Image API endpoint
    'mon_v2': PORT_BASE + 5,
    'mon_v1': PORT_BASE + 6,         # Cinder hands os-brick the mon's legacy v1 address
    'mariadb': PORT_BASE + 10,
    'rabbitmq': PORT_BASE + 11,
    'rabbitmq_dist': PORT_BASE + 12,
    'epmd': PORT_BASE + 13,
    'ceph_ms_min': PORT_BASE + 20,   # mgr/osd messengers bind within this window
    'ceph_ms_max': PORT_BASE + 49,
}
REGION = 'RegionOne'
RBD_POOL = 'volumes'
RGW_NAME = 'client.rgw.lab'
# Created up front: else RGW creates the bucket pools on the first bucket/object, ~5 s added to
# the first S3 request of a test.
RGW_POOLS = ('.rgw.root', 'default.rgw.log', 'default.rgw.control', 'default.rgw.meta',
             'default.rgw.buckets.index', 'default.rgw.buckets.data', 'default.rgw.buckets.non-ec')
CINDER_HOST = 'lab'
CINDER_BACKEND = 'ceph'
VOLUME_TYPES = {'lab-rbd': {}, 'lab-rbd-multiattach': {'multiattach': '<is> True'}}
# Glance multi-store: store id -> glance_store driver. Image data in RGW (bucket GLANCE_S3_BUCKET,
# as the lab's S3 user), in Cinder image-volumes (project `service`), and in a directory.
GLANCE_STORES = {'s3store': 's3', 'cinderstore': 'cinder', 'filestore': 'file', 'cindersingle': 'cinder'}
# The mount-path route for Cinder (docs/openstack.md, "Route 2"): a Glance file store
# that holds nothing itself and only names the store of the file:// locations that point into an imgfs
# mount, so Glance can show and delete them. Not in GLANCE_STORES: no image is ever imported into it.
GLANCE_MOUNT_STORE = 'imgfsmount'
# Where Cinder gets image bytes (tests/lab/cinder-image-route): from Glance as in a stock cloud, or from
# an imgfs Image API endpoint on PORTS['imgfs_api'], or through an imgfs mount (file:// locations).
# 'imgfs-endpoint-fallback' lists the real Glance after the endpoint: what a node that must survive a
# stopped imgfs configures.
CINDER_IMAGE_ROUTES = ('glance', 'imgfs-endpoint', 'imgfs-endpoint-fallback', 'imgfs-mount')
GLANCE_DEFAULT_STORE = 's3store'
GLANCE_S3_BUCKET = 'glance'
# Multiattach: an image-volume imgfs holds attached (on one or more hosts) can still be attached by
# Glance itself for a download or a copy-image; with lab-rbd the second attachment is refused.
GLANCE_VOLUME_TYPE = 'lab-rbd-multiattach'
# A second cinder store on the default, single-attach type, as most clouds have it: one holder at a
# time (Glance's download, or one host's imgfs), each holding the volume only while it reads.
GLANCE_SINGLE_STORE = 'cindersingle'
GLANCE_SINGLE_VOLUME_TYPE = 'lab-rbd'
# Marker put in every daemon's environment: tests/lab/down only signals process groups carrying it.
MARKER = 'IMGFS_LAB_DAEMON'


class LabError(Exception):
    pass


def log(msg: str) -> None:
    print(f'[lab up +{time.monotonic() - T0:5.1f}s] {msg}', file=sys.stderr, flush=True)


T0 = time.monotonic()


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors='replace').splitlines()[-n:]
    except OSError:
        return '    (no log)'
    return '\n'.join('    ' + line for line in lines)


def proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the PID, identifies a process even after PID reuse."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    fields = stat.rsplit(')', 1)[1].split()
    if fields[0] in ('Z', 'X'):     # exited, not yet reaped (by PID 1 once `up` has gone)
        return None
    return fields[19]


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Lab:
    def __init__(self) -> None:
        self.log_dir = DATA / 'log'
        self.pid_dir = DATA / 'pids'
        self.ceph_dir = DATA / 'ceph'
        self.ceph_conf = self.ceph_dir / 'ceph.conf'
        self.secrets: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        # Cinder runs `ceph mon dump`; privsep-helper and friends come from the lab venv.
        self.env['PATH'] = f'{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        self.env[MARKER] = str(LAB)
        for var in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV', 'OS_CLOUD', 'OS_AUTH_URL'):
            self.env.pop(var, None)

    # --- processes -----------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.log_dir / f'{name}.log'

    def running(self, name: str) -> int | None:
        """PID of daemon `name` if the recorded process is still the one we started."""
        try:
            pid_s, start = (self.pid_dir / f'{name}.pid').read_text().split()[:2]
        except (OSError, ValueError):
            return None
        pid = int(pid_s)
        return pid if proc_starttime(pid) == start else None

    def log_since_start(self, name: str) -> str:
        """The part of a daemon's log written since `start()` last launched it."""
        text = self.log_path(name).read_text(errors='replace')
        return text[text.rfind('\n==== '):]

    def assert_alive(self, name: str) -> None:
        proc = self.procs.get(name)
        dead = proc.poll() is not None if proc else self.running(name) is None
        if dead:
            code = f' with code {proc.returncode}' if proc else ''
            path = self.log_path(name)
            raise LabError(f'{name} exited{code}; its log {path} ends with:\n{tail(path)}')

    def wait_for(self, what: str, check, timeout: float, daemons: tuple[str, ...] = (),
                 interval: float = 0.5):
        """Polls check() until it returns a truthy value; fails early if one of `daemons` died."""
        deadline = time.monotonic() + timeout
        last_exc = None
        while True:
            try:
                result = check()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001 - any failure just means "not yet"
                last_exc = exc
            for name in daemons:
                self.assert_alive(name)
            if time.monotonic() > deadline:
                logs = ', '.join(str(self.log_path(d)) for d in daemons) or 'n/a'
                raise LabError(f'timed out after {timeout:.0f} s waiting for {what} '
                               f'(last error: {last_exc!r}); logs: {logs}')
            time.sleep(interval)

    def start(self, name: str, argv: list[str], *, cwd: Path, ports: tuple[int, ...] = (),
              env: dict | None = None) -> bool:
        """Starts a daemon in its own session unless it already runs. Returns True if started."""
        if self.running(name):
            return False
        busy = [p for p in ports if port_open(p)]
        if busy:
            raise LabError(f'cannot start {name}: port(s) {busy} on {HOST} already in use by a process '
                           f'the lab did not record (ss -ltnp to see it)')
        cwd.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path(name), 'ab')
        logf.write(f'\n==== {time.strftime("%F %T")} lab start: {" ".join(argv)}\n'.encode())
        logf.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env or self.env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        start = proc_starttime(proc.pid)
        (self.pid_dir / f'{name}.pid').write_text(f'{proc.pid} {start} {argv[0]}\n')
        self.procs[name] = proc
        log(f'started {name} (pid {proc.pid}, log {self.log_path(name)})')
        return True

    def run(self, argv: list[str], *, what: str | None = None, timeout: float = 120,
            check: bool = True, input: str | None = None, env: dict | None = None,
            quiet: bool = False) -> subprocess.CompletedProcess:
        """Runs a setup command to completion; on failure the error names the command and its output."""
        try:
            cp = subprocess.run(argv, env=env or self.env, input=input, capture_output=True, text=True,
                                timeout=timeout, cwd=DATA)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f'{what or argv[0]} timed out after {timeout} s: {" ".join(argv)}') from exc
        if check and cp.returncode != 0:
            raise LabError(f'{what or argv[0]} failed ({cp.returncode}): {" ".join(argv)}\n'
                           f'{cp.stdout[-2000:]}{cp.stderr[-3000:]}')
        if not quiet and cp.returncode == 0 and what:
            log(what)
        return cp

    def ceph(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(['ceph', '-c', str(self.ceph_conf), '--connect-timeout', '20', *args],
                        timeout=timeout, check=check, quiet=True)

    # --- secrets -----------------------------------------------------------------------------------
    def load_secrets(self) -> None:
        path = DATA / 'secrets.json'
        if path.exists():
            self.secrets = json.loads(path.read_text())
            return
        # never beginning with '-': a password is passed on some command line, and a leading '-' reads
        # as an option there (keystone-manage bootstrap failed on one)
        pw = lambda: 'p' + secrets.token_urlsafe(18)  # noqa: E731
        self.secrets = {
            'ceph_fsid': str(uuid.uuid4()),
            'osd_uuid': str(uuid.uuid4()),
            'rbd_secret_uuid': str(uuid.uuid4()),
            'mariadb_cinder': pw(), 'mariadb_glance': pw(),
            'rabbitmq_user': 'lab', 'rabbitmq_password': pw(),
            'keystone': {'admin': pw(), 'cinder': pw(), 'glance': pw(), 'imgfs': pw(), 'demo': pw()},
            's3_access_key': secrets.token_hex(10).upper(),
            's3_secret_key': secrets.token_urlsafe(30),
        }
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(self.secrets, indent=1))
        tmp.chmod(0o600)
        tmp.rename(path)

    # --- MariaDB -----------------------------------------------------------------------------------
    def mariadb(self) -> None:
        d = DATA / 'mariadb'
        datadir, sock = d / 'data', d / 'mysqld.sock'
        if not (d / '.lab-initialised').exists():
            shutil.rmtree(datadir, ignore_errors=True)
            datadir.mkdir(parents=True)
            self.run(['mariadb-install-db', '--no-defaults', f'--datadir={datadir}', '--user=root',
                      '--skip-test-db', '--auth-root-authentication-method=socket'],
                     what='mariadb: datadir initialised')
            (d / '.lab-initialised').touch()
        self.start('mariadb', [
            '/usr/sbin/mariadbd', '--no-defaults', '--user=root', f'--datadir={datadir}',
            f'--socket={sock}', f'--pid-file={d}/mariadbd.pid', f'--bind-address={HOST}',
            f'--port={PORTS["mariadb"]}', '--skip-name-resolve', '--skip-log-bin',
            '--innodb-buffer-pool-size=64M', '--innodb-flush-log-at-trx-commit=2',
            '--performance-schema=OFF', '--max-connections=300', f'--tmpdir={d}',
            f'--log-error={self.log_path("mariadb")}',
            '--character-set-server=utf8mb4', '--collation-server=utf8mb4_general_ci',
        ], cwd=d, ports=(PORTS['mariadb'],))

        def sql(query: str) -> subprocess.CompletedProcess:
            return self.run(['mariadb', '--no-defaults', f'--socket={sock}', '-uroot', '-e', query],
                            timeout=20, quiet=True)
        self.wait_for('mariadb to accept connections', lambda: sql('SELECT 1'), 60, ('mariadb',))
        stmts = []
        for db in ('cinder', 'glance'):
            user_pw = self.secrets[f'mariadb_{db}']
            stmts += [f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4",
                      f"CREATE USER IF NOT EXISTS '{db}'@'{HOST}' IDENTIFIED BY '{user_pw}'",
                      f"ALTER USER '{db}'@'{HOST}' IDENTIFIED BY '{user_pw}'",
                      f"GRANT ALL PRIVILEGES ON {db}.* TO '{db}'@'{HOST}'"]
        sql('; '.join(stmts))
        log('mariadb: ready (databases cinder, glance)')

    def db_url(self, db: str) -> str:
        return (f'mysql+pymysql://{db}:{self.secrets[f"mariadb_{db}"]}@{HOST}:{PORTS["mariadb"]}/{db}'
                '?charset=utf8mb4')

    # --- RabbitMQ ----------------------------------------------------------------------------------
    def rabbitmq(self) -> None:
        d = DATA / 'rabbitmq'
        (d / 'home').mkdir(parents=True, exist_ok=True)
        self.start('epmd', ['/usr/bin/epmd', '-port', str(PORTS['epmd']), '-address', HOST],
                   cwd=d, ports=(PORTS['epmd'],))
        self.wait_for('epmd', lambda: port_open(PORTS['epmd']), 20, ('epmd',), interval=0.2)
        (d / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = {HOST}:{PORTS["rabbitmq"]}\n'
            f'default_user = {self.secrets["rabbitmq_user"]}\n'
            f'default_pass = {self.secrets["rabbitmq_password"]}\n'
            'default_vhost = /\n'
            'disk_free_limit.absolute = 100MB\n'
            'vm_memory_high_watermark.absolute = 512MB\n'
            'log.console = false\n'
            'log.file.level = info\n')
        (d / 'enabled_plugins').write_text('[].\n')   # no management plugin: no extra listeners
        (d / 'rabbitmq-env.conf').write_text('')      # keep /etc/rabbitmq/rabbitmq-env.conf out
        env = dict(self.env)
        env.update({
            'HOME': str(d / 'home'),                     # the Erlang cookie lives here
            'RABBITMQ_NODENAME': 'lab@localhost',
            'RABBITMQ_NODE_IP_ADDRESS': HOST,
            'RABBITMQ_NODE_PORT': str(PORTS['rabbitmq']),
            'RABBITMQ_DIST_PORT': str(PORTS['rabbitmq_dist']),
            'ERL_EPMD_PORT': str(PORTS['epmd']),
            'ERL_EPMD_ADDRESS': HOST,
            'RABBITMQ_CONF_ENV_FILE': str(d / 'rabbitmq-env.conf'),
            'RABBITMQ_CONFIG_FILE': str(d / 'rabbitmq.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': str(d / 'advanced.config'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': str(d / 'enabled_plugins'),
            'RABBITMQ_MNESIA_BASE': str(d / 'mnesia'),
            'RABBITMQ_LOG_BASE': str(self.log_dir),
            # the file its stdout also goes to (both append): one log per daemon
            'RABBITMQ_LOGS': str(self.log_path('rabbitmq')),
            'RABBITMQ_PID_FILE': str(d / 'rabbitmq.pid'),
            # Without this the distribution port listens on every interface.
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS': '-kernel inet_dist_use_interface {127,0,0,1}',
        })
        self.start('rabbitmq', ['/usr/lib/rabbitmq/bin/rabbitmq-server'], cwd=d, env=env,
                   ports=(PORTS['rabbitmq'], PORTS['rabbitmq_dist']))

    def wait_rabbitmq(self) -> None:
        def amqp_ready() -> bool:
            # A real AMQP handshake: the broker answers the protocol header with Connection.Start
            # only once it has booted (the port can be open earlier).
            with socket.create_connection((HOST, PORTS['rabbitmq']), timeout=2) as s:
                s.sendall(b'AMQP\x00\x00\x09\x01')
                return s.recv(1)[:1] == b'\x01'
        self.wait_for('rabbitmq to answer AMQP', amqp_ready, 90, ('epmd', 'rabbitmq'))
        log('rabbitmq: ready')

    def transport_url(self) -> str:
        return (f'rabbit://{self.secrets["rabbitmq_user"]}:{self.secrets["rabbitmq_password"]}'
                f'@{HOST}:{PORTS["rabbitmq"]}/')

    # --- Ceph --------------------------------------------------------------------------------------
    def write_ceph_conf(self) -> None:
        c, lg = self.ceph_dir, self.log_dir
        self.ceph_conf.write_text(f"""\
# Written by tests/lab/labctl.py: a one-OSD Ceph on {HOST} for the imgfs lab. Nothing in /etc/ceph.
[global]
fsid = {self.secrets['ceph_fsid']}
mon host = [v2:{HOST}:{PORTS['mon_v2']},v1:{HOST}:{PORTS['mon_v1']}]
public addr = {HOST}
# without it the OSD's cluster and heartbeat-back messengers listen on 0.0.0.0
cluster addr = {HOST}
ms bind ipv6 = false
ms bind port min = {PORTS['ceph_ms_min']}
ms bind port max = {PORTS['ceph_ms_max']}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
run dir = {c}/run
crash dir = {c}/crash
# Each daemon logs into the file its stdout/stderr go to (both append): one log per daemon.

[client]
keyring = {c}/$cluster.$name.keyring

[mon]
mon data = {c}/mon/$cluster-$id
keyring = $mon_data/keyring
admin socket = $run_dir/$cluster-$name.asok
log file = {lg}/ceph-mon.log
log to stderr = false
err to stderr = false
mon cluster log file = {lg}/ceph-cluster.log
# restful/nfs are default-on in pacific and only add noise here
mgr initial modules = iostat

[mgr]
mgr data = {c}/mgr/$cluster-$id
keyring = $mgr_data/keyring
admin socket = $run_dir/$cluster-$name.asok
log file = {lg}/ceph-mgr.log
log to stderr = false
err to stderr = false

[osd]
osd data = {c}/osd/$cluster-$id
keyring = $osd_data/keyring
admin socket = $run_dir/$cluster-$name.asok
log file = {lg}/ceph-osd.log
log to stderr = false
err to stderr = false
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 21474836480
osd memory target = 1073741824

[{RGW_NAME}]
rgw data = {c}/rgw
keyring = {c}/rgw/keyring
admin socket = $run_dir/$cluster-$name.asok
log file = {lg}/radosgw.log
log to stderr = false
err to stderr = false
rgw frontends = beast endpoint={HOST}:{PORTS['rgw']}
rgw dns name = {HOST}
# per-user bytes sent/received (radosgw-admin usage show): benchmarks count what left RGW, whoever read
rgw enable usage log = true
rgw usage log tick interval = 1
rgw usage log flush threshold = 1
""")

    def ceph_rbd(self) -> None:
        """mon, mgr, osd.0, the RBD pool and client.cinder: all Cinder needs."""
        c = self.ceph_dir
        for sub in ('run', 'crash', 'mon', 'mgr', 'osd', 'rgw'):
            (c / sub).mkdir(parents=True, exist_ok=True)
        self.write_ceph_conf()
        admin_keyring = c / 'ceph.client.admin.keyring'
        mon_dir = c / 'mon' / 'ceph-a'
        if not (mon_dir / '.lab-mkfs-done').exists():
            shutil.rmtree(mon_dir, ignore_errors=True)
            for f in ('mon.keyring', 'monmap'):
                (c / f).unlink(missing_ok=True)
            if not admin_keyring.exists():
                self.run(['ceph-authtool', '--create-keyring', str(admin_keyring), '--gen-key',
                          '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *',
                          '--cap', 'mds', 'allow *', '--cap', 'mgr', 'allow *'])
            self.run(['ceph-authtool', '--create-keyring', str(c / 'mon.keyring'), '--gen-key',
                      '-n', 'mon.', '--cap', 'mon', 'allow *'])
            self.run(['ceph-authtool', str(c / 'mon.keyring'), '--import-keyring', str(admin_keyring)])
            self.run(['monmaptool', '--create', '--fsid', self.secrets['ceph_fsid'], '--addv', 'a',
                      f'[v2:{HOST}:{PORTS["mon_v2"]},v1:{HOST}:{PORTS["mon_v1"]}]', str(c / 'monmap')])
            self.run(['ceph-mon', '-c', str(self.ceph_conf), '--mkfs', '-i', 'a',
                      '--monmap', str(c / 'monmap'), '--keyring', str(c / 'mon.keyring')],
                     what='ceph: mon a created')
            (mon_dir / '.lab-mkfs-done').touch()
        self.start('ceph-mon', ['ceph-mon', '-f', '-c', str(self.ceph_conf), '-i', 'a'], cwd=c,
                   ports=(PORTS['mon_v2'], PORTS['mon_v1']))
        self.wait_for('ceph-mon quorum', lambda: self.ceph('mon', 'stat', timeout=30), 60,
                      ('ceph-mon',))
        log('ceph: mon up')

        mgr_dir = c / 'mgr' / 'ceph-x'
        if not (mgr_dir / 'keyring').exists():
            mgr_dir.mkdir(parents=True, exist_ok=True)
            self.ceph('auth', 'get-or-create', 'mgr.x', 'mon', 'allow profile mgr', 'osd', 'allow *',
                      'mds', 'allow *', '-o', str(mgr_dir / 'keyring'))
        self.start('ceph-mgr', ['ceph-mgr', '-f', '-c', str(self.ceph_conf), '-i', 'x'], cwd=c)

        # Pools can be created before any OSD exists; do it now, while the OSD's mkfs runs next.
        if not (c / '.lab-pools').exists():
            self.create_pools({RBD_POOL: 'rbd', **{p: 'rgw' for p in RGW_POOLS}})
            (c / '.lab-pools').touch()

        osd_dir = c / 'osd' / 'ceph-0'
        if not (osd_dir / '.lab-mkfs-done').exists():
            # `ceph osd new` with a fixed uuid is idempotent: a rerun after a crash gets id 0 again.
            osd_id = self.ceph('osd', 'new', self.secrets['osd_uuid']).stdout.strip()
            if osd_id != '0':
                raise LabError(f'ceph osd new returned id {osd_id!r}, expected 0')
            shutil.rmtree(osd_dir, ignore_errors=True)
            osd_dir.mkdir(parents=True)
            # --no-mon-config: else mkfs tries to fetch config from the mon and fails
            self.run(['ceph-osd', '-c', str(self.ceph_conf), '-i', '0', '--mkfs', '--mkkey',
                      '--no-mon-config', '--osd-uuid', self.secrets['osd_uuid']],
                     what='ceph: osd.0 bluestore created', timeout=180)
            self.ceph('auth', 'del', 'osd.0', check=False)
            self.ceph('auth', 'add', 'osd.0', 'osd', 'allow *', 'mon', 'allow profile osd',
                      'mgr', 'allow profile osd', '-i', str(osd_dir / 'keyring'))
            (osd_dir / '.lab-mkfs-done').touch()
        self.start('ceph-osd', ['ceph-osd', '-f', '-c', str(self.ceph_conf), '-i', '0'], cwd=c)

        def osd_up() -> bool:
            st = json.loads(self.ceph('osd', 'stat', '-f', 'json').stdout)
            return st.get('num_up_osds', st.get('osdmap', {}).get('num_up_osds')) == 1
        self.wait_for('osd.0 up', osd_up, 120, ('ceph-mon', 'ceph-mgr', 'ceph-osd'))
        log('ceph: osd.0 up')

        pool_marker = c / f'.lab-pool-{RBD_POOL}'
        if not pool_marker.exists():
            self.run(['rbd', '-c', str(self.ceph_conf), 'pool', 'init', RBD_POOL], timeout=120)
            pool_marker.touch()
        # Reading the pool blocks until its PGs are active: proves it usable (also after a restart).
        self.run(['rados', '-c', str(self.ceph_conf), '-p', RBD_POOL, 'stat', 'rbd_info'],
                 timeout=120, what=f'ceph: pool {RBD_POOL} usable')
        cinder_keyring = c / 'ceph.client.cinder.keyring'
        if not cinder_keyring.exists():
            self.ceph('auth', 'get-or-create', 'client.cinder', 'mon', 'profile rbd',
                      'osd', f'profile rbd pool={RBD_POOL}', 'mgr', f'profile rbd pool={RBD_POOL}',
                      '-o', str(cinder_keyring))

    def ceph_rgw(self) -> None:
        c = self.ceph_dir
        rgw_keyring = c / 'rgw' / 'keyring'
        if not rgw_keyring.exists():
            self.ceph('auth', 'get-or-create', RGW_NAME, 'mon', 'allow rw', 'osd', 'allow rwx',
                      'mgr', 'allow rw', '-o', str(rgw_keyring))
        self.start('radosgw', ['radosgw', '-f', '-c', str(self.ceph_conf), '-n', RGW_NAME], cwd=c,
                   ports=(PORTS['rgw'],))

        def rgw_ready() -> bool:
            with urllib.request.urlopen(f'http://{HOST}:{PORTS["rgw"]}/', timeout=3) as r:
                return r.status == 200
        self.wait_for('radosgw to answer HTTP', rgw_ready, 120, ('ceph-osd', 'radosgw'))
        info = self.run(['radosgw-admin', '-c', str(self.ceph_conf), 'user', 'info', '--uid=imgfs'],
                        check=False, quiet=True, timeout=60)
        if info.returncode != 0:
            self.run(['radosgw-admin', '-c', str(self.ceph_conf), 'user', 'create', '--uid=imgfs',
                      '--display-name=imgfs lab', f'--access-key={self.secrets["s3_access_key"]}',
                      f'--secret-key={self.secrets["s3_secret_key"]}'], timeout=60,
                     what='ceph: rgw user imgfs created')
        log('ceph: radosgw ready')

    def create_pools(self, pools: dict[str, str]) -> None:
        """Creates pools {name: application} through one librados session, all commands at once:
        one `ceph` CLI run costs ~0.3 s, and each map change waits for a Paxos round (~1 s) unless
        the mon can batch them."""
        import rados
        with rados.Rados(conffile=str(self.ceph_conf), rados_id='admin') as cluster:
            def mon(cmd: dict) -> None:
                ret, _, err = cluster.mon_command(json.dumps(cmd), b'', timeout=60)
                if ret != 0:
                    raise LabError(f'ceph {cmd["prefix"]} {cmd["pool"]}: {err} '
                                   f'(mon log: {self.log_path("ceph-mon")})')
            with concurrent.futures.ThreadPoolExecutor(len(pools)) as ex:
                list(ex.map(mon, [{'prefix': 'osd pool create', 'pool': name, 'pg_num': 8,
                                   'pgp_num': 8} for name in pools]))
                list(ex.map(mon, [{'prefix': 'osd pool application enable', 'pool': name,
                                   'app': app, 'yes_i_really_mean_it': True}
                                  for name, app in pools.items()]))
        log(f'ceph: {len(pools)} pools created ({RBD_POOL} and RGW\'s)')

    def ceph_health(self) -> dict:
        """Waits (bounded) for HEALTH_OK; a lasting warning is reported, not fatal: pools work."""
        health: dict = {}

        def ok() -> bool:
            nonlocal health
            health = json.loads(self.ceph('health', 'detail', '-f', 'json').stdout)
            return health.get('status') == 'HEALTH_OK'
        try:
            self.wait_for('ceph HEALTH_OK', ok, 30, ('ceph-mon', 'ceph-mgr', 'ceph-osd'), interval=1)
        except LabError:
            checks = {k: v.get('summary', {}).get('message')
                      for k, v in health.get('checks', {}).items()}
            log(f'warning: ceph is {health.get("status")}: {checks} (pools are usable; continuing)')
        return health

    # --- Keystone ----------------------------------------------------------------------------------
    @property
    def keystone_url(self) -> str:
        return f'http://{HOST}:{PORTS["keystone"]}/v3'

    def keystone(self) -> None:
        d = DATA / 'keystone'
        d.mkdir(parents=True, exist_ok=True)
        conf = d / 'keystone.conf'
        conf.write_text(f"""\
[DEFAULT]
log_file = {self.log_dir}/keystone.log
[database]
connection = sqlite:///{d}/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = {d}/fernet-keys
[fernet_receipts]
key_repository = {d}/fernet-keys
[credential]
key_repository = {d}/credential-keys
[identity]
max_password_length = 72
# lab only: bcrypt with 2^4 rounds makes a login 13 ms instead of 345 ms
password_hash_rounds = 4
[cache]
enabled = true
backend = oslo_cache.dict
expiration_time = 600
""")
        manage = [f'{VENV}/bin/keystone-manage', '--config-file', str(conf)]
        if not (d / '.lab-bootstrapped').exists():
            self.run(manage + ['db_sync'], what='keystone: db_sync', timeout=300)
            # What fernet_setup/credential_setup create (keys 0 = staged, 1 = primary), written here:
            # each keystone-manage run costs 3-6 s of imports on this machine.
            from cryptography.fernet import Fernet
            for repo in ('fernet-keys', 'credential-keys'):
                shutil.rmtree(d / repo, ignore_errors=True)
                (d / repo).mkdir(mode=0o700)
                for key_id in ('0', '1'):
                    fd = os.open(d / repo / key_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, 'wb') as f:
                        f.write(Fernet.generate_key())
            # '--opt=value': a lab dir made before passwords began with a letter may still hold one beginning with '-'
            self.run(manage + ['bootstrap', f"--bootstrap-password={self.secrets['keystone']['admin']}",
                               '--bootstrap-admin-url', self.keystone_url,
                               '--bootstrap-internal-url', self.keystone_url,
                               '--bootstrap-public-url', self.keystone_url,
                               '--bootstrap-region-id', REGION], what='keystone: bootstrapped')
            (d / '.lab-bootstrapped').touch()
        env = dict(self.env, OS_KEYSTONE_CONFIG_DIR=str(d))
        # uWSGI, one process: SQLite and the in-process token cache want exactly one.
        self.start('keystone', [
            f'{VENV}/bin/uwsgi', '--http-socket', f'{HOST}:{PORTS["keystone"]}',
            '--module', 'keystone.wsgi.api:application', '--master', '--processes', '1',
            '--threads', '4', '--enable-threads', '--lazy-apps', '--need-app', '--die-on-term',
            '--buffer-size', '65535', '--disable-logging', '--procname-prefix', 'lab-keystone-',
            # --http-socket has no keep-alive but does not say so: a client reusing a pooled
            # connection races uWSGI's close and gets ECONNRESET now and then.
            '--add-header', 'Connection: close',
        ], cwd=d, env=env, ports=(PORTS['keystone'],))
        self.wait_for('keystone to issue a token', lambda: self.admin_session().get_token(), 60,
                      ('keystone',))
        log('keystone: token issued')
        self.keystone_catalog()

    def session(self, user: str, project: str):
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3
        auth = v3.Password(auth_url=self.keystone_url, username=user,
                           password=self.secrets['keystone'][user], project_name=project,
                           user_domain_name='Default', project_domain_name='Default')
        return ks_session.Session(auth=auth, timeout=30)

    def password_works(self, user: str, password: str) -> bool:
        from keystoneauth1 import exceptions as ks_exc
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3
        auth = v3.Password(auth_url=self.keystone_url, username=user, password=password,
                           user_domain_name='Default')
        try:
            ks_session.Session(auth=auth, timeout=30).get_token()
            return True
        except ks_exc.Unauthorized:
            return False

    def admin_session(self):
        return self.session('admin', 'admin')

    def keystone_catalog(self) -> None:
        """devstack's shape: service users with admin+service on `service`, and the catalog."""
        from keystoneclient.v3 import client as ks_client
        ks = ks_client.Client(session=self.admin_session(), interface='public')

        def find(manager, name, **kw):
            return next((o for o in manager.list(**kw) if o.name == name), None)

        domain = ks.domains.get('default')
        roles = {}
        for name in ('admin', 'member', 'reader', 'service'):
            roles[name] = find(ks.roles, name) or ks.roles.create(name)
        projects = {}
        for name in ('admin', 'service', 'demo'):
            projects[name] = find(ks.projects, name, domain=domain) or ks.projects.create(name, domain)
        grants = {'cinder': ('service', ('admin', 'service')),
                  'glance': ('service', ('admin', 'service')),
                  'imgfs': ('service', ('admin', 'service')),
                  'demo': ('demo', ('member', 'reader'))}
        for user, (project, role_names) in grants.items():
            pw = self.secrets['keystone'][user]
            u = find(ks.users, user, domain=domain)
            if u is None:
                u = ks.users.create(user, domain=domain, password=pw, default_project=projects[project])
            elif not self.password_works(user, pw):
                # Only when needed: a password change revokes the user's tokens (running services).
                ks.users.update(u, password=pw, enabled=True)
            have = {a.role['id'] for a in ks.role_assignments.list(user=u, project=projects[project])}
            for r in role_names:
                if roles[r].id not in have:
                    ks.roles.grant(roles[r], user=u, project=projects[project])
        services = {
            ('volumev3', 'cinderv3'): f'http://{HOST}:{PORTS["cinder"]}/v3/$(project_id)s',
            ('image', 'glance'): f'http://{HOST}:{PORTS["glance"]}',
        }
        for (stype, sname), url in services.items():
            svc = next((s for s in ks.services.list(type=stype) if s.name == sname), None)
            svc = svc or ks.services.create(sname, type=stype, enabled=True)
            have = {e.interface: e for e in ks.endpoints.list(service=svc)}
            for iface in ('public', 'internal', 'admin'):
                if iface not in have:
                    ks.endpoints.create(svc, url, interface=iface, region=REGION)
                elif have[iface].url != url:
                    ks.endpoints.update(have[iface], url=url)
        log('keystone: users, roles and catalog ensured')

    # --- Cinder ------------------------------------------------------------------------------------
    def cinder_config(self) -> Path:
        d = DATA / 'cinder'
        for sub in ('state', 'locks', 'coordination'):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf = d / 'cinder.conf'
        ks = self.secrets['keystone']
        # cinder-volume runs `sudo cinder-rootwrap <conf> qemu-img ...` (hard-coded) to convert images: a
        # `sudo` that drops the rootwrap prefix and runs the command (the lab runs as root already),
        # first on the Cinder daemons' PATH only.
        (d / 'bin').mkdir(exist_ok=True)
        sudo = d / 'bin' / 'sudo'
        sudo.write_text('#!/bin/sh\n# imgfs lab: cinder runs as root already\n'
                        '[ "$1" = cinder-rootwrap ] && shift 2\nexec "$@"\n')
        sudo.chmod(0o755)
        route = self.cinder_image_route()
        image_source = {
            'glance': '# images from Glance itself (glance_catalog_info), as in a stock cloud',
            'imgfs-endpoint': f'glance_api_servers = http://{HOST}:{PORTS["imgfs_api"]}',
            'imgfs-endpoint-fallback': f'glance_api_servers = http://{HOST}:{PORTS["imgfs_api"]},'
                                       f'http://{HOST}:{PORTS["glance"]}\nglance_num_retries = 3',
            'imgfs-mount': 'allowed_direct_url_schemes = file',
        }[route]
        conf.write_text(f"""\
[DEFAULT]
host = {CINDER_HOST}
my_ip = {HOST}
state_path = {d}/state
auth_strategy = keystone
api_paste_config = {VENV}/etc/cinder/api-paste.ini
rootwrap_config = {VENV}/etc/cinder/rootwrap.conf
transport_url = {self.transport_url()}
osapi_volume_listen = {HOST}
osapi_volume_listen_port = {PORTS['cinder']}
osapi_volume_workers = 1
enabled_backends = {CINDER_BACKEND}
default_volume_type = lab-rbd
glance_catalog_info = image:glance:publicURL
# image route: {route} (tests/lab/cinder-image-route)
{image_source}
image_conversion_dir = {d}/conversion
# stop fast on SIGTERM (tests/lab/down): the default waits up to 60 s
graceful_shutdown_timeout = 5
[database]
connection = {self.db_url('cinder')}
[keystone_authtoken]
www_authenticate_uri = {self.keystone_url}
auth_url = {self.keystone_url}
auth_type = password
username = cinder
password = {ks['cinder']}
user_domain_name = Default
project_name = service
project_domain_name = Default
service_token_roles_required = true
[glance]
# service credentials: Cinder reads image locations (Image API 2.17) as a service user
auth_type = password
auth_url = {self.keystone_url}
username = cinder
password = {ks['cinder']}
user_domain_name = Default
project_name = service
project_domain_name = Default
region_name = {REGION}
[oslo_concurrency]
lock_path = {d}/locks
[coordination]
backend_url = file://{d}/coordination
[oslo_messaging_notifications]
driver = noop
[{CINDER_BACKEND}]
volume_backend_name = {CINDER_BACKEND}
volume_driver = cinder.volume.drivers.rbd.RBDDriver
rbd_pool = {RBD_POOL}
rbd_ceph_conf = {self.ceph_conf}
rbd_user = cinder
rbd_secret_uuid = {self.secrets['rbd_secret_uuid']}
rbd_flatten_volume_from_snapshot = false
rados_connect_timeout = 20
""")
        return conf

    def cinder_db(self) -> None:
        conf = self.cinder_config()
        marker = DATA / 'cinder' / '.lab-db-synced'
        if not marker.exists():
            self.run([f'{VENV}/bin/cinder-manage', '--config-file', str(conf), 'db', 'sync'],
                     what='cinder: db sync', timeout=300)
            marker.touch()

    def cinder_start(self, binaries: tuple[str, ...] = ('cinder-api', 'cinder-scheduler', 'cinder-volume')) -> None:
        """Needs MariaDB, RabbitMQ and Ceph; not Keystone (cinder-api asks it only per request)."""
        d = DATA / 'cinder'
        conf = d / 'cinder.conf'
        env = dict(self.env, PATH=f'{d}/bin:{self.env["PATH"]}')
        for binary in binaries:
            self.start(binary, [f'{VENV}/bin/{binary}', '--config-file', str(conf),
                                '--log-file', str(self.log_path(binary))], cwd=d, env=env,
                       ports=(PORTS['cinder'],) if binary == 'cinder-api' else ())

    def cinder_image_route(self) -> str:
        try:
            route = (DATA / 'cinder' / 'image-route').read_text().strip()
        except FileNotFoundError:
            return 'glance'
        return route if route in CINDER_IMAGE_ROUTES else 'glance'

    def set_cinder_image_route(self, route: str) -> None:
        """Point Cinder's image downloads at `route`, restarting cinder-api and cinder-volume (both
        talk to Glance) only if the route changes. The route survives `down`/`up`."""
        if route not in CINDER_IMAGE_ROUTES:
            raise LabError(f'unknown image route {route!r}; one of {", ".join(CINDER_IMAGE_ROUTES)}')
        self.load_secrets()
        if route == self.cinder_image_route() and all(self.running(b) for b in ('cinder-api', 'cinder-volume')):
            log(f'cinder: image route already {route}')
            return
        (DATA / 'cinder' / 'image-route').write_text(route + '\n')
        self.cinder_config()
        daemons = ('cinder-api', 'cinder-volume')
        for name in daemons:
            self.stop(name)
        self.cinder_start(daemons)
        self.cinder_ready()
        log(f'cinder: image route {route}')

    def stop(self, name: str, timeout: float = 30) -> None:
        """SIGTERM the daemon's process group (it was started with setsid), SIGKILL after `timeout`."""
        pid = self.running(name)
        if pid is None:
            return
        os.killpg(pid, 15)
        deadline = time.monotonic() + timeout
        while self.running(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running(name):
            os.killpg(pid, 9)
            while self.running(name):
                time.sleep(0.1)
        log(f'stopped {name}')

    def cinder_ready(self) -> None:
        from cinderclient import client as cinder_client
        cinder = cinder_client.Client('3.60', session=self.admin_session(), region_name=REGION)

        daemons = ('cinder-api', 'cinder-scheduler', 'cinder-volume')
        want = {('cinder-scheduler', CINDER_HOST),
                ('cinder-volume', f'{CINDER_HOST}@{CINDER_BACKEND}')}

        def services_up() -> bool:
            state = {(s.binary, s.host): (s.state, s.status) for s in cinder.services.list()}
            return all(state.get(k) == ('up', 'enabled') for k in want)

        def volume_ready() -> bool:
            # After a restart the service table still says `up` for up to a minute and the
            # scheduler still lists the old pool: the current process's own log is the proof.
            since = self.log_since_start('cinder-volume')
            if 'Failed to initialize driver' in since:
                raise LabError(f'cinder-volume: RBD driver failed to initialise; see '
                               f'{self.log_path("cinder-volume")}')
            return 'Driver post RPC initialization completed successfully' in since
        api_root = f'http://{HOST}:{PORTS["cinder"]}/'
        self.wait_for('cinder-api', lambda: self._http_status(api_root) in (200, 300), 90,
                      ('cinder-api',))
        self.wait_for('cinder-volume to initialise its driver', volume_ready, 120, daemons)
        self.wait_for('cinder-scheduler and cinder-volume to report up', services_up, 120, daemons,
                      interval=1)
        # The backend pool in the scheduler proves the RBD driver reported its stats.
        self.wait_for('the ceph pool in cinder-scheduler',
                      lambda: cinder.pools.list(detailed=True), 120, daemons, interval=1)
        log('cinder: api, scheduler and volume up')
        for name, specs in VOLUME_TYPES.items():
            vt = next((t for t in cinder.volume_types.list(is_public=None) if t.name == name), None)
            vt = vt or cinder.volume_types.create(name, description='imgfs lab', is_public=True)
            want = {'volume_backend_name': CINDER_BACKEND, **specs}
            if vt.get_keys() != want:
                vt.set_keys(want)
        log(f'cinder: volume types {", ".join(VOLUME_TYPES)} ensured')
        # The unauthenticated version document (HTTP 300) names the highest microversion.
        try:
            urllib.request.urlopen(f'http://{HOST}:{PORTS["cinder"]}/', timeout=10)
        except urllib.error.HTTPError as e:
            versions = json.load(e).get('versions', [])
            self.cinder_max_version = next((v['version'] for v in versions
                                            if v['id'] == 'v3.0'), None)

    @staticmethod
    def _http_status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    # --- Glance ------------------------------------------------------------------------------------
    @property
    def glance_dir(self) -> Path:
        return DATA / 'glance'

    @property
    def glance_url(self) -> str:
        return f'http://{HOST}:{PORTS["glance"]}'

    def glance_config(self) -> Path:
        """glance-api.conf and what the cinder store needs to run as root without sudo or /etc."""
        d = self.glance_dir
        for sub in ('images', 'staging', 'tasks', 'locks', 'mnt', 'bin', 'etc-ceph', 'rootwrap.d'):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # glance_store runs `sudo glance-rootwrap <rootwrap_config> privsep-helper ...` (hard-coded):
        # a `sudo` that only execs its arguments, first on glance-api's PATH (and nobody else's).
        sudo = d / 'bin' / 'sudo'
        sudo.write_text('#!/bin/sh\n# imgfs lab: glance-api runs as root already\nexec "$@"\n')
        sudo.chmod(0o755)
        (d / 'rootwrap.conf').write_text(f"""\
[DEFAULT]
filters_path = {d}/rootwrap.d
# the lab venv first: privsep-helper lives there
exec_dirs = {VENV}/bin,/usr/local/sbin,/usr/local/bin,/usr/sbin,/usr/bin,/sbin,/bin
use_syslog = False
""")
        # The shipped filter accepts only --config-file /etc/...: ours lives in the lab dir.
        (d / 'rootwrap.d' / 'glance_cinder_store.filters').write_text("""\
[Filters]
privsep-rootwrap: RegExpFilter, privsep-helper, root, privsep-helper, --config-file, /(?!.*/\\.\\.).*, --privsep_context, os_brick.privileged.default, --privsep_sock_path, /tmp/.*
disk_chown: RegExpFilter, chown, root, chown, \\d+, /dev/(?!.*/\\.\\.).*
""")
        conf = d / 'glance-api.conf'
        ks = self.secrets['keystone']
        backends = ', '.join(f'{k}:{v}' for k, v in {**GLANCE_STORES, GLANCE_MOUNT_STORE: 'file'}.items())
        (d / 'imgfsmount-unused').mkdir(exist_ok=True)
        cinder_stanzas = ''.join(
            self._glance_cinder_stanza(d, store, vtype)
            for store, vtype in (('cinderstore', GLANCE_VOLUME_TYPE), (GLANCE_SINGLE_STORE, GLANCE_SINGLE_VOLUME_TYPE)))
        conf.write_text(f"""\
# Written by tests/lab/labctl.py (imgfs lab). Secrets inside: keep 0600.
[DEFAULT]
log_file = {self.log_path('glance-api')}
enabled_backends = {backends}
# lab only: every location (with metadata.store) and direct_url in the image JSON
show_multiple_locations = True
show_image_direct_url = True
enabled_import_methods = [glance-direct,web-download,copy-image]
worker_self_reference_url = {self.glance_url}
[database]
connection = {self.db_url('glance')}
[paste_deploy]
flavor = keystone
config_file = {VENV}/etc/glance/glance-api-paste.ini
[keystone_authtoken]
www_authenticate_uri = {self.keystone_url}
auth_url = {self.keystone_url}
auth_type = password
username = glance
password = {ks['glance']}
user_domain_name = Default
project_name = service
project_domain_name = Default
service_token_roles_required = true
[glance_store]
default_backend = {GLANCE_DEFAULT_STORE}
[s3store]
s3_store_host = http://{HOST}:{PORTS['rgw']}
s3_store_access_key = {self.secrets['s3_access_key']}
s3_store_secret_key = {self.secrets['s3_secret_key']}
s3_store_bucket = {GLANCE_S3_BUCKET}
s3_store_create_bucket_on_put = True
s3_store_bucket_url_format = path
# no s3_store_region_name: with it the bucket gets a LocationConstraint RGW rejects
{cinder_stanzas}[filestore]
filesystem_store_datadir = {d}/images
[{GLANCE_MOUNT_STORE}]
# holds nothing: it names the store of file:// locations into an imgfs mount (never import into it)
description = imgfs mount path (node-local, read-only)
filesystem_store_datadir = {d}/imgfsmount-unused
[os_glance_staging_store]
filesystem_store_datadir = {d}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {d}/tasks
[oslo_concurrency]
lock_path = {d}/locks
[os_brick]
lock_path = {d}/locks
[oslo_messaging_notifications]
driver = noop
""")
        conf.chmod(0o600)
        return conf

    def _glance_cinder_stanza(self, d: Path, store: str, volume_type: str) -> str:
        ks = self.secrets['keystone']
        return f"""\
[{store}]
cinder_store_auth_address = {self.keystone_url}
cinder_store_user_name = glance
cinder_store_password = {ks['glance']}
cinder_store_project_name = service
cinder_store_user_domain_name = Default
cinder_store_project_domain_name = Default
cinder_os_region_name = {REGION}
cinder_volume_type = {volume_type}
cinder_use_multipath = False
cinder_state_transition_timeout = 120
cinder_mount_point_base = {d}/mnt
rootwrap_config = {d}/rootwrap.conf
"""

    def glance_db(self) -> None:
        """Config + schema; needs only MariaDB."""
        conf = self.glance_config()
        marker = self.glance_dir / '.lab-db-synced'
        if not marker.exists():
            self.run([f'{VENV}/bin/glance-manage', '--config-file', str(conf), 'db_sync'],
                     what='glance: db sync', timeout=300)
            marker.touch()

    def glance_start(self) -> None:
        """Needs Keystone and Cinder answering: the cinder store looks its volume type up at start."""
        d = self.glance_dir
        # os-brick's RBD connector reads /etc/ceph/ceph.client.<user>.keyring (Cinder sends no
        # keyring): glance-api gets a private mount namespace with this copy bound over /etc/ceph.
        if not Path('/etc/ceph').is_dir():
            raise LabError('/etc/ceph does not exist (ceph-common creates it): glance-api binds its '
                           'own copy over it; run tests/lab/install')
        for f in ('ceph.conf', 'ceph.client.cinder.keyring'):
            shutil.copyfile(self.ceph_dir / f, d / 'etc-ceph' / f)
        (d / 'etc-ceph' / 'ceph.client.cinder.keyring').chmod(0o600)
        env = dict(self.env, OS_GLANCE_CONFIG_DIR=str(d), PATH=f'{d}/bin:{self.env["PATH"]}')
        uwsgi = [
            f'{VENV}/bin/uwsgi', '--http-socket', f'{HOST}:{PORTS["glance"]}',
            '--module', 'glance.wsgi.api:application', '--master', '--processes', '1',
            '--threads', '8', '--enable-threads', '--lazy-apps', '--need-app', '--die-on-term',
            '--buffer-size', '65535', '--http-chunked-input', '--http-auto-chunked',
            # the 1 MB default rejects 1 MiB chunks ("unable to receive chunked part" -> 500)
            '--chunked-input-limit', str(16 * 1024 * 1024),
            '--thunder-lock', '--disable-logging', '--procname-prefix', 'lab-glance-',
            '--add-header', 'Connection: close',
        ]
        # `unshare` and `sh` exec in place: the recorded PID stays the uWSGI master.
        self.start('glance-api', [
            '/usr/bin/unshare', '--mount', '--propagation', 'private', '--',
            '/bin/sh', '-c', 'mount --bind "$1" /etc/ceph && shift && exec "$@"', 'sh',
            str(d / 'etc-ceph'), *uwsgi,
        ], cwd=d, env=env, ports=(PORTS['glance'],))

    def glance_ready(self) -> None:
        self.wait_for('glance-api /healthcheck',
                      lambda: self._http_status(f'{self.glance_url}/healthcheck') == 200, 90,
                      ('glance-api',))
        sess = self.session('glance', 'service')

        def stores() -> set:
            r = sess.get(f'{self.glance_url}/v2/info/stores', raise_exc=False)
            return r.status_code == 200 and {s['id'] for s in r.json()['stores']}
        got = self.wait_for('glance-api to list its stores (Keystone auth)', stores, 60,
                            ('glance-api',))
        if got != {*GLANCE_STORES, GLANCE_MOUNT_STORE}:
            raise LabError(f'glance-api lists stores {sorted(got)}, expected {sorted(GLANCE_STORES)} and '
                           f'{GLANCE_MOUNT_STORE}; '
                           f'see {self.log_path("glance-api")}')
        log(f'glance: api up, stores {", ".join(GLANCE_STORES)} (default {GLANCE_DEFAULT_STORE})')

    # --- lab.json ----------------------------------------------------------------------------------
    def write_lab_json(self, health: dict) -> None:
        ks = self.secrets['keystone']
        user = lambda name, project: {'username': name, 'password': ks[name],  # noqa: E731
                                      'project_name': project, 'user_domain_name': 'Default',
                                      'project_domain_name': 'Default'}
        c = self.ceph_dir
        doc = {
            'schema': 1,
            'lab_dir': str(LAB),
            'data_dir': str(DATA),
            'host': HOST,
            'ports': {k: v for k, v in PORTS.items()},
            'keystone': {
                'auth_url': self.keystone_url,
                'region_name': REGION,
                'users': {
                    'admin': {**user('admin', 'admin'), 'roles': ['admin']},
                    'imgfs': {**user('imgfs', 'service'), 'roles': ['admin', 'service']},
                    'cinder': {**user('cinder', 'service'), 'roles': ['admin', 'service']},
                    'glance': {**user('glance', 'service'), 'roles': ['admin', 'service']},
                    'demo': {**user('demo', 'demo'), 'roles': ['member', 'reader']},
                },
            },
            'cinder': {
                'endpoint': f'http://{HOST}:{PORTS["cinder"]}/v3',
                'catalog': {'service_type': 'volumev3', 'service_name': 'cinderv3',
                            'interface': 'public', 'region_name': REGION},
                'microversion_max': getattr(self, 'cinder_max_version', None),
                'volume_types': {'default': 'lab-rbd', 'multiattach': 'lab-rbd-multiattach'},
                'backend_host': f'{CINDER_HOST}@{CINDER_BACKEND}#{CINDER_BACKEND}',
                'conf': str(DATA / 'cinder' / 'cinder.conf'),
                'image_route': self.cinder_image_route(),
                'imgfs_api_url': f'http://{HOST}:{PORTS["imgfs_api"]}',
            },
            'glance': {
                'deployed': True,
                'endpoint': self.glance_url,
                'catalog': {'service_type': 'image', 'service_name': 'glance',
                            'interface': 'public', 'region_name': REGION},
                'conf': str(self.glance_dir / 'glance-api.conf'),
                'config_dir': str(self.glance_dir),
                'database_url': self.db_url('glance'),
                'stores': dict(GLANCE_STORES),
                'mount_store': GLANCE_MOUNT_STORE,
                'default_store': GLANCE_DEFAULT_STORE,
                'filestore_dir': str(self.glance_dir / 'images'),
                's3_bucket': GLANCE_S3_BUCKET,
                'cinder_volume_type': GLANCE_VOLUME_TYPE,
                'single_attach_store': GLANCE_SINGLE_STORE,
                'single_attach_volume_type': GLANCE_SINGLE_VOLUME_TYPE,
                'cinder_store_project': 'service',
                'log': str(self.log_path('glance-api')),
            },
            'ceph': {
                'conf': str(self.ceph_conf),
                'fsid': self.secrets['ceph_fsid'],
                'mon_host': f'[v2:{HOST}:{PORTS["mon_v2"]},v1:{HOST}:{PORTS["mon_v1"]}]',
                'rbd_pool': RBD_POOL,
                'rbd_user': 'cinder',
                'client_cinder_keyring': str(c / 'ceph.client.cinder.keyring'),
                'client_admin_keyring': str(c / 'ceph.client.admin.keyring'),
                'rbd_secret_uuid': self.secrets['rbd_secret_uuid'],
                'health': health.get('status'),
            },
            's3': {
                'endpoint_url': f'http://{HOST}:{PORTS["rgw"]}',
                'access_key': self.secrets['s3_access_key'],
                'secret_key': self.secrets['s3_secret_key'],
                'region_name': 'us-east-1',
                'addressing_style': 'path',
                'rgw_user': 'imgfs',
            },
            'rabbitmq': {'transport_url': self.transport_url()},
            'mariadb': {'host': HOST, 'port': PORTS['mariadb'],
                        'socket': str(DATA / 'mariadb' / 'mysqld.sock')},
            'logs': {p.stem: str(p) for p in sorted(self.log_dir.glob('*.log'))},
            'pids_dir': str(self.pid_dir),
            'written_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        }
        path = LAB / 'lab.json'
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(doc, indent=2) + '\n')
        tmp.chmod(0o600)
        tmp.rename(path)

    # --- the whole ---------------------------------------------------------------------------------
    def up(self) -> None:
        if not all((VENV / 'bin' / b).exists() for b in ('cinder-volume', 'glance-manage')):
            raise LabError(f'no lab venv at {VENV}: run tests/lab/install first')
        missing = [b for b in ('ceph-mon', 'ceph-mgr', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph',
                               'rbd', 'rados', 'monmaptool', 'ceph-authtool', 'mariadbd',
                               'mariadb-install-db', 'mariadb', 'epmd')
                   if not shutil.which(b, path=self.env['PATH'])]
        if missing or not Path('/usr/lib/rabbitmq/bin/rabbitmq-server').exists():
            raise LabError(f'missing {missing or "rabbitmq-server"}: run tests/lab/install first')
        for d in (DATA, self.log_dir, self.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.load_secrets()
        # Ceph, Keystone (SQLite) and MariaDB+RabbitMQ do not depend on each other: set them up side
        # by side (keystone-manage, cinder-manage and the OSD's mkfs are the slow steps). Cinder's
        # daemons start once MariaDB, RabbitMQ and Ceph's RBD pool are there, while Keystone may
        # still be starting; RGW (not needed by Cinder) comes up meanwhile.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ceph = pool.submit(self.ceph_rbd)
            keystone = pool.submit(self.keystone)
            self.mariadb()
            self.rabbitmq()
            self.cinder_db()
            self.glance_db()        # while RabbitMQ boots
            self.wait_rabbitmq()
            ceph.result()
            self.cinder_start()
            rgw = pool.submit(self.ceph_rgw)
            keystone.result()
            self.cinder_ready()
            self.glance_start()
            rgw.result()
            self.glance_ready()
        health = self.ceph_health()
        self.write_lab_json(health)
        log(f'lab is up: {LAB / "lab.json"}')


def status() -> int:
    lab = Lab()
    rc = 0
    for pidfile in sorted(lab.pid_dir.glob('*.pid')):
        name = pidfile.stem
        pid = lab.running(name)
        print(f'{name:18} {"running pid " + str(pid) if pid else "NOT RUNNING"}   {lab.log_path(name)}')
        rc |= pid is None
    if not any(lab.pid_dir.glob('*.pid')):
        print('lab is down (no pid files)')
        return 1
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('command', choices=('up', 'status', 'cinder-image-route'))
    ap.add_argument('route', nargs='?', choices=CINDER_IMAGE_ROUTES)
    args = ap.parse_args()
    if args.command == 'status':
        return status()
    try:
        if args.command == 'cinder-image-route':
            if args.route is None:
                print(Lab().cinder_image_route())
                return 0
            Lab().set_cinder_image_route(args.route)
            return 0
        Lab().up()
    except LabError as exc:
        print(f'[lab up] ERROR: {exc}', file=sys.stderr)
    except Exception:  # noqa: BLE001 - unexpected: show where, then the same hint
        import traceback
        traceback.print_exc()
        print('[lab up] ERROR: unexpected failure (traceback above)', file=sys.stderr)
    else:
        return 0
    print('[lab up] daemons already started keep running; stop them with tests/lab/down',
          file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
