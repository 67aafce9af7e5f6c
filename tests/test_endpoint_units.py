"""The Image API endpoint's pieces without a lab: Range semantics (Glance's), its [imgfs] options and
their one-line errors, the mount-path guard, and the authorization cache's key."""

from __future__ import annotations

import pytest

from imgfs import config
from imgfs.endpoint import _MultipleRanges, _Unsatisfiable, parse_range
from imgfs.errors import ConfigError
from imgfs.upstream import _identity, forwarded_headers

from .test_config import GLANCE_API_CONF, write

SIZE = 1000


@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-99", (0, 100)),
    ("bytes=0-0", (0, 1)),
    ("bytes=990-", (990, 1000)),
    ("bytes=990-5000", (990, 1000)),      # an end past the image is clipped
    ("bytes=-10", (990, 1000)),
    ("bytes=-5000", (0, 1000)),           # a suffix longer than the image is the whole image
    (" bytes=5-9 ", (5, 10)),
])
def test_satisfiable_ranges(header, expected):
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=10-5", "bytes=-0", "bytes=x-y",
                                    "items=0-5", "bytes=", "bytes=-", "0-5"])
def test_unsatisfiable_ranges_are_416(header):
    with pytest.raises(_Unsatisfiable):
        parse_range(header, SIZE)


def test_several_ranges_are_400_as_in_glance():
    with pytest.raises(_MultipleRanges):
        parse_range("bytes=0-1,5-6", SIZE)


def test_empty_image_has_no_satisfiable_range():
    with pytest.raises(_Unsatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(_Unsatisfiable):
        parse_range("bytes=-1", 0)


def load(tmp_path, imgfs_section: str, extra: str = ""):
    glance = write(tmp_path, "glance-api.conf", GLANCE_API_CONF)
    return config.load([glance, write(tmp_path, "imgfs.conf", "[imgfs]\n" + imgfs_section + "\n" + extra)])


def test_endpoint_is_off_unless_listen_is_set(tmp_path):
    assert load(tmp_path, "").image_api is None


@pytest.mark.parametrize("listen, host, port", [("9393", "127.0.0.1", 9393), ("127.0.0.1:9393", "127.0.0.1", 9393),
                                                ("localhost:80", "127.0.0.1", 80), ("[::1]:9393", "::1", 9393),
                                                ("0.0.0.0:9292", "0.0.0.0", 9292)])
def test_listen_forms(tmp_path, listen, host, port):
    api = load(tmp_path, f"image_api_listen = {listen}\nimage_api_upstream = http://glance.example:9292").image_api
    assert (api.host, api.port, api.upstream, api.auth) == (host, port, "http://glance.example:9292", None)
    assert api.auth_ttl == 30 and api.timeout == 300


@pytest.mark.parametrize("listen", ["glance.example:9393", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:", "abc"])
def test_bad_listen_is_one_line_naming_the_option(tmp_path, listen):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"image_api_listen = {listen}\nimage_api_upstream = http://glance.example:9292")
    assert "[imgfs] image_api_listen" in str(e.value) and "\n" not in str(e.value)


def test_bad_upstream_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "image_api_listen = 9393\nimage_api_upstream = glance.example:9292")
    assert "[imgfs] image_api_upstream" in str(e.value) and "http(s)://" in str(e.value)


def test_without_upstream_glance_is_found_in_the_catalog_of_glance_catalog(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "image_api_listen = 9393")
    assert "[glance_catalog] auth_url is missing" in str(e.value) and "image_api_upstream" in str(e.value)
    api = load(tmp_path, "image_api_listen = 9393", "[glance_catalog]\nauth_url = https://keystone.example/v3\n"
               "username = imgfs\npassword = s3cret-pw\nproject_name = service\n").image_api
    assert api.upstream is None and api.auth.username == "imgfs"
    assert "s3cret-pw" not in repr(api)


def test_file_store_inside_the_mount_is_never_read(tmp_path, caplog):
    mount = tmp_path / "mnt"
    mount.mkdir()
    cfg = config.load([write(tmp_path, "g.conf", f"""
        [DEFAULT]
        enabled_backends = files:file, imgfsmount:file
        [files]
        filesystem_store_datadir = {tmp_path}/files
        [imgfsmount]
        filesystem_store_datadir = {mount}/images
        """)])
    kept = config.refuse_own_mount(cfg, str(mount))
    assert [s.name for s in kept.stores] == ["files"]
    assert "inside this imgfs mount" in caplog.text
    only_mount = config.load([write(tmp_path, "h.conf", f"""
        [DEFAULT]
        enabled_backends = imgfsmount:file
        [imgfsmount]
        filesystem_store_datadir = {mount}/images
        """)])
    with pytest.raises(ConfigError):
        config.refuse_own_mount(only_mount, str(mount))


def test_authorization_cache_key_is_the_callers_identity_not_its_request():
    base = [(b"X-Auth-Token", b"tok-A"), (b"User-Agent", b"glanceclient"), (b"Host", b"127.0.0.1:9393")]
    a1 = forwarded_headers(base + [(b"X-OpenStack-Request-ID", b"req-1"), (b"Range", b"bytes=0-1")], "127.0.0.1")
    a2 = forwarded_headers(base + [(b"X-OpenStack-Request-ID", b"req-2")], "127.0.0.2")
    b = forwarded_headers([(b"X-Auth-Token", b"tok-B"), (b"User-Agent", b"glanceclient")], None)
    with_service = forwarded_headers(base + [(b"X-Service-Token", b"svc")], None)
    assert _identity(a1) == _identity(a2)
    assert len({_identity(a1), _identity(b), _identity(with_service)}) == 3
    assert "tok-A" not in _identity(a1)


def test_hop_by_hop_headers_are_not_forwarded_but_host_is():
    out = dict(forwarded_headers([(b"Connection", b"keep-alive"), (b"Transfer-Encoding", b"chunked"), (b"Host", b"h:1"),
                                  (b"Expect", b"100-continue"), (b"X-Auth-Token", b"t")], "10.0.0.1"))
    assert out == {b"host": b"h:1", b"x-auth-token": b"t", b"x-forwarded-for": b"10.0.0.1"}


@pytest.mark.mount
def test_endpoint_address_in_use_stops_the_daemon_with_one_line(tmp_path):
    """Cinder and Nova are pointed at the endpoint: a node whose endpoint cannot listen must not look
    ready. Exit 1 (a restart may find the port free), one line naming the option, the mount gone."""
    import socket
    import subprocess
    import sys

    from .conftest import is_mounted

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "img").write_bytes(b"x" * 100)
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = write(tmp_path, "imgfs.conf", f"""
            [DEFAULT]
            enabled_backends = f:file
            [f]
            filesystem_store_datadir = {tmp_path}/files
            [imgfs]
            cache_dir = {tmp_path}/cache
            control_socket = {tmp_path}/ctl.sock
            image_api_listen = 127.0.0.1:{port}
            image_api_upstream = http://127.0.0.1:9
            """)
        result = subprocess.run([sys.executable, "-m", "imgfs", "mount", str(tmp_path / "mnt"), "--config-file", conf],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot listen on 127.0.0.1:" in errors[0] and "image_api_listen" in errors[0]
    assert "Traceback" not in result.stderr
    assert not is_mounted(tmp_path / "mnt")
