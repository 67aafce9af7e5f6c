"""Download an image with Nova's own code, unmodified, as nova-compute does when it boots from an image:
``nova.virt.images.fetch`` -> ``nova.image.glance.API.download`` -> glanceclient (which checks the
image's os_hash_value), with ``[glance] endpoint_override`` set the way an operator points Nova at a
node-local Image API endpoint. Runs with the lab venv's python (nova is installed there, never run as a
service).

    nova_download.py ENDPOINT IMAGE_ID DEST_PATH      (env: NOVA_TOKEN, NOVA_USER_ID, NOVA_PROJECT_ID)

Prints one JSON line: {"bytes": N, "seconds": S, "sha512": ...}; exits 1 with the error on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time


def main() -> int:
    endpoint, image_id, dest = sys.argv[1:4]
    import nova.conf
    from nova import context as nova_context
    from nova.virt import images

    conf = nova.conf.CONF
    conf([], project="nova", default_config_files=[])
    conf.set_override("endpoint_override", endpoint, group="glance")
    conf.set_override("num_retries", 0, group="glance")  # one try: a failure must show, not be retried away
    ctx = nova_context.RequestContext(user_id=os.environ["NOVA_USER_ID"], project_id=os.environ["NOVA_PROJECT_ID"],
                                      auth_token=os.environ["NOVA_TOKEN"], is_admin=False)
    began = time.monotonic()
    try:
        images.fetch(ctx, image_id, dest)
    except Exception as e:  # noqa: BLE001 - the test wants the error's name and text
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    seconds = time.monotonic() - began
    digest = hashlib.sha512()
    with open(dest, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    print(json.dumps({"bytes": os.path.getsize(dest), "seconds": round(seconds, 3), "sha512": digest.hexdigest()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
