"""The layering rules, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "imgfs"


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything a module imports (relative imports resolved within imgfs)."""
    module = ".".join(("imgfs",) + path.relative_to(PKG).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


MODULES = {str(p.relative_to(PKG)): imports_of(p) for p in PKG.rglob("*.py")}


def users_of(prefix: str) -> set[str]:
    return {m for m, names in MODULES.items() if any(n == prefix or n.startswith(prefix + ".") for n in names)}


@pytest.mark.parametrize(
    "library, allowed",
    [
        # the FUSE adapter, the composition root, and the hand-over of the FUSE session
        ("pyfuse3", {"fs.py", "daemon.py", "handover/__init__.py", "handover/session.py"}),
        ("boto3", {"backends/s3.py", "demo.py"}),
        ("botocore", {"backends/s3.py", "backends/s3_ranged.py"}),
        ("urllib3", {"backends/s3.py", "fleet/mesh.py", "httpbody.py"}),
        ("os_brick", {"backends/cinder.py"}),
        ("cinderclient", {"backends/cinder.py"}),
        ("keystoneauth1", {"backends/cinder.py", "glance.py"}),
        ("oslo_concurrency", {"backends/cinder.py"}),
        ("hypercorn", set()),
        ("h11", {"httpserver.py"}),
        ("httpx", {"upstream.py"}),
    ],
)
def test_third_party_libraries_stay_in_their_module(library, allowed):
    assert users_of(library) <= allowed


@pytest.mark.parametrize(
    "module, may_import",
    [
        ("fs.py", {"imgfs.reader", "imgfs.catalog", "imgfs.errors", "imgfs.model", "imgfs.ratelimit", "imgfs.disks",
                   "imgfs.handover"}),
        # the hand-over: the FUSE connection, systemd's fd store and the state; nothing of stores or images
        ("handover/session.py", {"imgfs.errors", "imgfs.handover"}),
        ("handover/state.py", {"imgfs.errors"}),
        ("handover/connection.py", {"imgfs.errors"}),
        ("handover/fdstore.py", set()),
        # raw disks: the reader and the formats, never FUSE, HTTP or a store
        ("disks.py", {"imgfs.reader", "imgfs.catalog", "imgfs.errors", "imgfs.model", "imgfs.formats",
                      "imgfs.buffers"}),
        ("formats/qcow2.py", {"imgfs.errors", "imgfs.formats"}),
        # the fleet's chunk sums: a store's sidecar objects, nothing of nginx or the reader
        ("fleet/sums.py", {"imgfs.errors", "imgfs.model", "imgfs.ratelimit"}),
        # the HTTP adapter: like fs.py, plus the real Glance behind it; never a store or the cache
        ("endpoint.py", {"imgfs.reader", "imgfs.catalog", "imgfs.errors", "imgfs.model", "imgfs.ratelimit",
                         "imgfs.upstream", "imgfs.config", "imgfs.httpserver"}),
        # the HTTP/1.1 server knows nothing of images, Glance or stores
        ("httpserver.py", {"imgfs.ratelimit"}),
        ("upstream.py", {"imgfs.config", "imgfs.errors", "imgfs.glance"}),
        ("reader.py", {"imgfs.cache", "imgfs.backends", "imgfs.errors", "imgfs.model"}),
        ("cache.py", {"imgfs.model", "imgfs.ratelimit", "imgfs.buffers", "imgfs.workers"}),
        ("workers.py", set()),
        ("ratelimit.py", set()),
        ("buffers.py", set()),  # reused receive buffers: for stores and the mesh alike, knowing neither
        ("httpbody.py", set()),  # bodies received in place: for stores and the mesh alike, knowing neither
        ("attach.py", {"imgfs.errors", "imgfs.model"}),
        ("catalog.py", {"imgfs.backends", "imgfs.errors", "imgfs.model", "imgfs.glance"}),
        ("model.py", set()),
        ("errors.py", set()),
        ("config.py", {"imgfs.errors"}),
    ],
)
def test_internal_layering(module, may_import):
    ours = {n for n in MODULES[module] if n.startswith("imgfs.")}
    assert all(any(n == m or n.startswith(m + ".") for m in may_import) for n in ours), ours


def test_backends_know_nothing_of_fuse_trio_or_the_cache():
    for name, imported in MODULES.items():
        if name.startswith("backends/"):
            assert not {n for n in imported if n.split(".")[0] in ("trio", "pyfuse3")}, name
            assert not {n for n in imported if n.startswith(("imgfs.fs", "imgfs.cache", "imgfs.reader", "imgfs.daemon"))}, name
