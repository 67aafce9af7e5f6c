"""End-to-end proof that the lab's Glance serves one image from three stores (S3, Cinder, file).

Run with imgfs's venv (keystoneauth1, cinderclient, boto3, rados, rbd; no glanceclient needed: the
Image API v2 is spoken with raw HTTP over a keystoneauth session):

    /work/main/.venv/bin/python tests/lab/smoke_glance.py

Steps, as user `imgfs` (admin on project `service`): create an image -> upload 64 MiB of random bytes
to the default store (s3store) -> active; size, checksum (md5) and os_hash_value (sha512) match ->
copy-image import into cinderstore and filestore -> `stores` lists all three, `locations` has three
entries with metadata.store -> download, sha512 matches -> the image-volume `image-<id>` exists in
Cinder (project service, metadata glance_image_id/image_size) and its first bytes (read with librbd,
as imgfs does) match -> the object is in RGW bucket `glance`, the file in the filestore dir -> delete
the image -> volume, object and file are gone. The image is deleted even on failure. Exit 0 = pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
LAB = Path(os.environ.get('IMGFS_LAB_DIR') or REPO / '.lab')
MiB = 1024 * 1024
SIZE = 64 * MiB
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


def safe_url(url: str) -> str:
    """A location URL without any user:password@ (older glance_store put S3 keys there)."""
    p = urllib.parse.urlsplit(url)
    return p._replace(netloc=p.netloc.rpartition('@')[2]).geturl()


def poll(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out after {timeout:.0f} s waiting for {what}')
        time.sleep(interval)


def main() -> int:
    lab_json = LAB / 'lab.json'
    if not lab_json.exists():
        print(f'no {lab_json}: is the lab up? (tests/lab/up)', file=sys.stderr)
        return 2
    cfg = json.loads(lab_json.read_text())
    g = cfg.get('glance', {})
    if not g.get('deployed'):
        print('lab.json says Glance is not deployed', file=sys.stderr)
        return 2

    import boto3
    import rados
    import rbd
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from cinderclient import client as cinder_client
    from cinderclient import exceptions as cexc
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    ks = cfg['keystone']
    u = ks['users']['imgfs']
    glance_log = g['log']
    with timed('keystone: token for imgfs'):
        auth = v3.Password(auth_url=ks['auth_url'], username=u['username'], password=u['password'],
                           project_name=u['project_name'], user_domain_name=u['user_domain_name'],
                           project_domain_name=u['project_domain_name'])
        sess = ks_session.Session(auth=auth, timeout=120)
        sess.get_token()
        project_id = sess.get_project_id()
    ep = sess.get_endpoint(service_type='image', interface='public',
                           region_name=ks['region_name']).rstrip('/')
    print(f'  glance endpoint from the catalog: {ep}')
    cinder = cinder_client.Client('3.60', session=sess, region_name=ks['region_name'])
    s3c = cfg['s3']
    s3 = boto3.client('s3', endpoint_url=s3c['endpoint_url'], aws_access_key_id=s3c['access_key'],
                      aws_secret_access_key=s3c['secret_key'], region_name=s3c['region_name'],
                      config=Config(s3={'addressing_style': s3c['addressing_style']}))

    def api(method: str, path: str, **kw):
        r = sess.request(f'{ep}{path}', method, raise_exc=False, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f'{method} {path}: HTTP {r.status_code}: {r.text[:500]} '
                               f'(glance-api log: {glance_log})')
        return r

    def image() -> dict:
        return api('GET', f'/v2/images/{image_id}').json()

    ok = True

    def check(cond: bool, msg: str) -> None:
        nonlocal ok
        print(f'  {"ok  " if cond else "FAIL"} {msg}')
        ok &= bool(cond)

    stores = api('GET', '/v2/info/stores').json()['stores']
    print('  stores: ' + ', '.join(s['id'] + (' (default)' if s.get('default') else '')
                                   for s in stores))
    check({s['id'] for s in stores} == set(g['stores']), f'stores are {sorted(g["stores"])}')

    data = os.urandom(SIZE)
    md5, sha512 = hashlib.md5(data).hexdigest(), hashlib.sha512(data).hexdigest()
    image_id = None
    try:
        with timed('glance: create image'):
            img = api('POST', '/v2/images', json={
                'name': 'imgfs-smoke-glance', 'disk_format': 'raw', 'container_format': 'bare',
                'visibility': 'private'}).json()
            image_id = img['id']
        print(f'  image {image_id} ({img["status"]})')
        with timed(f'glance: upload {SIZE // MiB} MiB to the default store'):
            api('PUT', f'/v2/images/{image_id}/file', data=data,
                headers={'Content-Type': 'application/octet-stream'})
        img = image()
        check(img['status'] == 'active', f'status {img["status"]}')
        check(img['size'] == SIZE, f'size {img["size"]}')
        check(img['checksum'] == md5, 'checksum (md5) matches')
        check(img['os_hash_algo'] == 'sha512' and img['os_hash_value'] == sha512,
              f'os_hash_value ({img["os_hash_algo"]}) matches')
        check(img.get('stores') == g['default_store'], f'stores: {img.get("stores")}')

        targets = [s for s in g['stores'] if s != g['default_store']]
        with timed(f'glance: copy-image into {", ".join(targets)} until done'):
            api('POST', f'/v2/images/{image_id}/import',
                json={'method': {'name': 'copy-image'}, 'stores': targets})

            def copied():
                im = image()
                failed = im.get('os_glance_failed_import')
                if failed:
                    raise RuntimeError(f'copy-image failed for {failed} (log: {glance_log})')
                have = set(filter(None, im.get('stores', '').split(',')))
                return im if have == set(g['stores']) else None
            img = poll('copy-image to finish', copied, 300)
        check(True, f'stores: {img["stores"]}')
        locs = {loc['metadata'].get('store'): loc['url'] for loc in img.get('locations', [])}
        for store, url in sorted(locs.items()):
            print(f'       location {store}: {safe_url(url)}')
        check(len(img.get('locations', [])) == len(g['stores']) and set(locs) == set(g['stores']),
              'one location per store, each with metadata.store')
        check(safe_url(img.get('direct_url', '')) == safe_url(img['locations'][0]['url']),
              'direct_url is the first location')

        with timed(f'glance: download {SIZE // MiB} MiB'):
            got = api('GET', f'/v2/images/{image_id}/file').content
        check(hashlib.sha512(got).hexdigest() == sha512, 'downloaded bytes: sha512 matches')
        del got

        # --- Cinder: the image-volume ---------------------------------------------------------------
        vol_id = locs['cinderstore'].rsplit('/', 1)[1]
        vol = cinder.volumes.get(vol_id)
        md = vol.metadata
        print(f'  volume {vol.id}: name {vol.name}, {vol.size} GiB, type {vol.volume_type}, '
              f'status {vol.status}, project {getattr(vol, "os-vol-tenant-attr:tenant_id", "?")}')
        check(vol.name == f'image-{image_id}', 'volume name is image-<image id>')
        check(md.get('glance_image_id') == image_id and md.get('image_size') == str(SIZE),
              f'volume metadata glance_image_id, image_size={md.get("image_size")}')
        check(vol.volume_type == g['cinder_volume_type'], f'volume type {vol.volume_type}')
        check(getattr(vol, 'os-vol-tenant-attr:tenant_id', None) == project_id,
              'volume lives in project service (the store\'s service credentials)')
        ceph = cfg['ceph']
        with timed(f'librbd: read {SIZE // MiB} MiB of volume-<id>'):
            with rados.Rados(conffile=ceph['conf'], rados_id=ceph['rbd_user'],
                             conf={'keyring': ceph['client_cinder_keyring']}) as cluster:
                with cluster.open_ioctx(ceph['rbd_pool']) as ioctx, \
                        rbd.Image(ioctx, f'volume-{vol_id}', read_only=True) as rimg:
                    head = rimg.read(0, SIZE)
        check(hashlib.sha512(head).hexdigest() == sha512, 'image-volume bytes: sha512 matches')
        del head

        # --- RGW and the filestore ------------------------------------------------------------------
        bucket = g['s3_bucket']
        key = locs['s3store'].rsplit('/', 1)[1]
        head_obj = s3.head_object(Bucket=bucket, Key=key)
        check(key == image_id and head_obj['ContentLength'] == SIZE,
              f'object {bucket}/{key} in RGW, {head_obj["ContentLength"]} bytes')
        fpath = Path(g['filestore_dir']) / image_id
        check(fpath.is_file() and fpath.stat().st_size == SIZE
              and urllib.parse.urlsplit(locs['filestore']).path == str(fpath),
              f'file {fpath}, {fpath.stat().st_size if fpath.exists() else "missing"} bytes')

        # --- delete ---------------------------------------------------------------------------------
        with timed('glance: delete image'):
            api('DELETE', f'/v2/images/{image_id}')
            image_id_deleted, image_id = image_id, None

        def vol_gone():
            try:
                cinder.volumes.get(vol_id)
                return False
            except cexc.NotFound:
                return True
        with timed('cinder: image-volume gone'):
            poll('the image-volume to be deleted', vol_gone, 120)

        def obj_gone():
            try:
                s3.head_object(Bucket=bucket, Key=key)
                return False
            except ClientError as exc:
                return exc.response['Error']['Code'] in ('404', 'NoSuchKey')
        check(obj_gone(), 'object gone from RGW')
        check(not fpath.exists(), 'file gone from the filestore')
        r = sess.get(f'{ep}/v2/images/{image_id_deleted}', raise_exc=False)
        check(r.status_code == 404, f'image gone (HTTP {r.status_code})')
    except Exception as exc:  # noqa: BLE001 - reported, then cleanup
        print(f'  FAIL {type(exc).__name__}: {exc}')
        ok = False
    finally:
        if image_id:
            r = sess.delete(f'{ep}/v2/images/{image_id}', raise_exc=False)
            print(f'  cleanup: deleted image {image_id} (HTTP {r.status_code})', file=sys.stderr)

    total = sum(dt for _, dt in TIMINGS)
    print(f'{"PASS" if ok else "FAIL"}: {len(TIMINGS)} timed steps, {total:.2f} s in them')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
