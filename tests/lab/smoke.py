"""End-to-end proof that the lab serves Cinder image-volumes the way imgfs will read them.

Run with imgfs's venv (where tests/lab/install put os-brick, cinderclient, keystoneauth1, rados, rbd):

    /work/main/.venv/bin/python tests/lab/smoke.py

Steps: Keystone password session as user `imgfs` -> cinderclient from the catalog -> 1 GiB volume of
type lab-rbd -> known bytes written into volume-<id> with librbd -> read-only attachment with os-brick
connector properties -> os-brick RBD connector (no kernel: a librbd handle) -> bytes read back and
compared -> second attachment from another host refused (HTTP 400) -> detach, delete. Then the same on
a multiattach volume, where the second host's attachment succeeds and both read the right bytes.
Finally a put/get on RGW's S3 API. Everything it creates is deleted, even on failure. Exit 0 = pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
LAB = Path(os.environ.get('IMGFS_LAB_DIR') or REPO / '.lab')
MiB = 1024 * 1024
TIMINGS: list[tuple[str, float]] = []


class timed:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t
        TIMINGS.append((self.what, dt))
        if exc[0] is None:
            print(f'  {dt * 1000:8.1f} ms  {self.what}', flush=True)


def wait_status(cinder, vol_id: str, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        vol = cinder.volumes.get(vol_id)
        if vol.status == want:
            return
        if vol.status.startswith('error') or time.monotonic() > deadline:
            raise RuntimeError(f'volume {vol_id} is {vol.status!r}, wanted {want!r} '
                               f'(cinder-volume log: {CFG["logs"].get("cinder-volume")})')
        time.sleep(0.2)


def wait_deleted(cinder, vol_id: str, timeout: float = 60) -> None:
    from cinderclient import exceptions as cexc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cinder.volumes.get(vol_id)
        except cexc.NotFound:
            return
        time.sleep(0.2)
    raise RuntimeError(f'volume {vol_id} still exists {timeout} s after delete')


def main() -> int:
    global CFG
    lab_json = LAB / 'lab.json'
    if not lab_json.exists():
        print(f'no {lab_json}: is the lab up? (tests/lab/up)', file=sys.stderr)
        return 2
    CFG = json.loads(lab_json.read_text())
    logging.basicConfig(level=logging.ERROR, format='  [log] %(name)s: %(message)s')

    # os-brick probes the host through an oslo.privsep daemon; as root, start it with `env` instead
    # of `sudo <rootwrap>`, and let it find this venv's privsep-helper on PATH.
    os.environ['PATH'] = f'{Path(sys.executable).parent}:{os.environ["PATH"]}'
    # oslo.privsep imports eventlet, which warns that it is deprecated: noise here.
    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
    from oslo_privsep import priv_context
    priv_context.init(root_helper=['env'])

    import boto3
    from botocore.config import Config
    import rados
    import rbd
    from cinderclient import client as cinder_client
    from cinderclient import exceptions as cexc
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3
    from os_brick.initiator import connector as brick_connector

    ks, ceph = CFG['keystone'], CFG['ceph']
    u = ks['users']['imgfs']
    keyring = Path(ceph['client_cinder_keyring']).read_text()
    created: list[str] = []          # volume ids to delete at the end
    attachments: list[str] = []      # attachment ids to delete at the end
    print(f'lab: {lab_json}')

    with timed('keystone: token for imgfs'):
        auth = v3.Password(auth_url=ks['auth_url'], username=u['username'], password=u['password'],
                           project_name=u['project_name'], user_domain_name=u['user_domain_name'],
                           project_domain_name=u['project_domain_name'])
        sess = ks_session.Session(auth=auth, timeout=30)
        sess.get_token()
    cinder = cinder_client.Client('3.60', session=sess, region_name=ks['region_name'],
                                  service_type='volumev3', interface='public')
    endpoint = sess.get_endpoint(service_type='volumev3', interface='public')
    print(f'  cinder endpoint from the catalog: {endpoint}')

    cluster = rados.Rados(conffile=ceph['conf'], rados_id=ceph['rbd_user'],
                          conf={'keyring': ceph['client_cinder_keyring']})
    cluster.connect(timeout=20)
    ioctx = cluster.open_ioctx(ceph['rbd_pool'])

    def new_volume(vtype: str) -> tuple[str, str, int]:
        """A 1 GiB volume holding known bytes at its start; returns (id, sha256, length)."""
        with timed(f'cinder: create 1 GiB volume of type {vtype} until available'):
            vol = cinder.volumes.create(size=1, name=f'imgfs-smoke-{vtype}', volume_type=vtype)
            created.append(vol.id)
            wait_status(cinder, vol.id, 'available')
        data = os.urandom(32 * MiB) + b'imgfs-lab-tail' * 1000
        with timed('librbd: write 32 MiB + tail into volume-<id>'):
            with rbd.Image(ioctx, f'volume-{vol.id}') as img:
                assert img.size() == 1024 * MiB, img.size()
                img.write(data, 0)
                img.flush()
        return vol.id, hashlib.sha256(data).hexdigest(), len(data)

    host = socket.gethostname()
    with timed('os-brick: get_connector_properties (starts privsep)'):
        props = brick_connector.get_connector_properties('env', '127.0.0.1', multipath=False,
                                                         enforce_multipath=False, host=f'{host}-a')
    props_b = dict(props, host=f'{host}-b')
    brick = brick_connector.InitiatorConnector.factory('RBD', 'env', do_local_attach=False)

    def attach_and_read(vol_id: str, connector: dict, length: int, label: str):
        with timed(f'{label}: attachments.create(mode=ro)'):
            att = cinder.attachments.create(vol_id, connector, mode='ro')
            attachments.append(att['id'])
        info = att['connection_info']
        assert info['driver_volume_type'] == 'rbd', info
        conn = dict(info['data'] if 'data' in info else info)   # attachments return the data dict
        conn['keyring'] = keyring   # Cinder sends none; os-brick writes a temp conf + keyring
        with timed(f'{label}: os-brick connect_volume (librbd handle)'):
            dev = brick.connect_volume(conn)
        with timed(f'{label}: read {length / MiB:.1f} MiB through the handle'):
            handle = dev['path']
            handle.seek(0)
            digest = hashlib.sha256(handle.read(length)).hexdigest()
        return att, conn, dev, digest

    def detach(att, conn, dev, label: str) -> None:
        with timed(f'{label}: disconnect_volume + attachments.delete'):
            brick.disconnect_volume(conn, dev)
            cinder.attachments.delete(att['id'])
            attachments.remove(att['id'])

    ok = True
    try:
        # --- a normal volume: one reader; a second host is refused --------------------------------
        print('non-multiattach volume (lab-rbd):')
        vol_id, sha, length = new_volume(CFG['cinder']['volume_types']['default'])
        att, conn, dev, got = attach_and_read(vol_id, props, length, 'host a')
        verdict = 'MATCH' if got == sha else 'MISMATCH'
        print(f'  sha256 written {sha[:16]}…, read {got[:16]}… -> {verdict}')
        ok &= got == sha
        with timed('host a: attachments.complete'):
            cinder.attachments.complete(att['id'])
        print(f'  volume status: {cinder.volumes.get(vol_id).status}, attach_mode '
              f'{cinder.attachments.show(att["id"]).attach_mode}')
        try:
            att_b = cinder.attachments.create(vol_id, props_b, mode='ro')
            attachments.append(att_b['id'])
            print('  UNEXPECTED: second host attached a non-multiattach volume')
            ok = False
        except cexc.BadRequest as exc:
            print(f'  second host refused as expected: HTTP {exc.code}: {exc.message}')
        detach(att, conn, dev, 'host a')
        wait_status(cinder, vol_id, 'available')
        with timed('cinder: delete volume until gone'):
            cinder.volumes.delete(vol_id)
            wait_deleted(cinder, vol_id)
            created.remove(vol_id)

        # --- a multiattach volume: two hosts read at once ------------------------------------------
        print('multiattach volume (lab-rbd-multiattach):')
        vol_id, sha, length = new_volume(CFG['cinder']['volume_types']['multiattach'])
        att_a, conn_a, dev_a, got_a = attach_and_read(vol_id, props, length, 'host a')
        cinder.attachments.complete(att_a['id'])
        att_b, conn_b, dev_b, got_b = attach_and_read(vol_id, props_b, length, 'host b')
        cinder.attachments.complete(att_b['id'])
        print(f'  host a {"MATCH" if got_a == sha else "MISMATCH"}, host b '
              f'{"MATCH" if got_b == sha else "MISMATCH"}; volume attachments: '
              f'{len(cinder.volumes.get(vol_id).attachments)}')
        ok &= got_a == sha and got_b == sha
        detach(att_a, conn_a, dev_a, 'host a')
        detach(att_b, conn_b, dev_b, 'host b')
        wait_status(cinder, vol_id, 'available')
        cinder.volumes.delete(vol_id)
        wait_deleted(cinder, vol_id)
        created.remove(vol_id)

        # --- RGW S3 ------------------------------------------------------------------------------------
        print('RGW S3:')
        s3c = CFG['s3']
        s3 = boto3.client('s3', endpoint_url=s3c['endpoint_url'], aws_access_key_id=s3c['access_key'],
                          aws_secret_access_key=s3c['secret_key'], region_name=s3c['region_name'],
                          config=Config(s3={'addressing_style': s3c['addressing_style']}))
        body = os.urandom(MiB)
        with timed('s3: create bucket, put, ranged get, delete'):
            s3.create_bucket(Bucket='imgfs-smoke')
            s3.put_object(Bucket='imgfs-smoke', Key='obj', Body=body)
            got = s3.get_object(Bucket='imgfs-smoke', Key='obj', Range='bytes=1000-1999')['Body'].read()
            s3.delete_object(Bucket='imgfs-smoke', Key='obj')
            s3.delete_bucket(Bucket='imgfs-smoke')
        print(f'  ranged get {"MATCH" if got == body[1000:2000] else "MISMATCH"}')
        ok &= got == body[1000:2000]
    finally:
        for att_id in list(attachments):
            try:
                cinder.attachments.delete(att_id)
            except Exception as exc:  # noqa: BLE001 - best-effort cleanup
                print(f'  cleanup: attachment {att_id}: {exc}', file=sys.stderr)
        for vol_id in created:
            try:
                wait_status(cinder, vol_id, 'available', timeout=30)
                cinder.volumes.delete(vol_id)
                print(f'  cleanup: deleted volume {vol_id}', file=sys.stderr)
            except Exception as exc:  # noqa: BLE001
                print(f'  cleanup: volume {vol_id}: {exc}', file=sys.stderr)
        ioctx.close()
        cluster.shutdown()

    total = sum(dt for _, dt in TIMINGS)
    print(f'{"PASS" if ok else "FAIL"}: {len(TIMINGS)} timed steps, {total:.2f} s in them')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
