"""Config: glance-api.conf compatibility, merging, and one-line errors that name file, section, option."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from imgfs import config
from imgfs.errors import ConfigError

from .conftest import ACCESS_KEY, SECRET_KEY

GLANCE_API_CONF = textwrap.dedent(
    f"""
    [DEFAULT]
    enabled_backends = s3store:s3, cinderstore:cinder, filestore:file
    show_multiple_locations = True
    worker_self_reference_url = http://127.0.0.1:9292/%(project_id)s
    [glance_store]
    default_backend = filestore
    [s3store]
    s3_store_host = 127.0.0.1:7480
    s3_store_access_key = {ACCESS_KEY}
    s3_store_secret_key = {SECRET_KEY}
    s3_store_bucket = glance
    s3_store_create_bucket_on_put = True
    s3_store_bucket_url_format = path
    [cinderstore]
    cinder_endpoint_template = http://127.0.0.1:8776/v3/%(project_id)s
    [filestore]
    filesystem_store_datadir = /var/lib/glance/images/
    [os_glance_staging_store]
    filesystem_store_datadir = /var/lib/glance/staging
    """
)


@pytest.fixture
def glance_conf(tmp_path):
    p = tmp_path / "glance-api.conf"
    p.write_text(GLANCE_API_CONF)
    return p


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_glance_api_conf_as_is(glance_conf, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = config.load([str(glance_conf)])
    assert [s.name for s in cfg.stores] == ["filestore", "s3store"]  # default backend first
    s3 = cfg.stores[1]
    assert isinstance(s3, config.S3StoreConfig)
    assert s3.endpoint_url == "http://127.0.0.1:7480"  # glance_store: a bare host is plain http
    assert s3.bucket == "glance" and s3.addressing_style == "path"
    assert cfg.stores[0].datadir == "/var/lib/glance/images"
    assert "cinderstore" in caplog.text and "skipping" in caplog.text
    assert cfg.options == config.ImgfsOptions()  # defaults


def test_secrets_not_in_repr(glance_conf):
    cfg = config.load([str(glance_conf)])
    assert SECRET_KEY not in repr(cfg) and ACCESS_KEY not in repr(cfg)


def test_later_file_wins_option_by_option(glance_conf, tmp_path):
    first = write(tmp_path, "a.conf", "[imgfs]\ncache_max_size_gb = 5\nchunk_size_mb = 4\n")
    second = write(tmp_path, "b.conf", "[imgfs]\nchunk_size_mb = 16\n")
    cfg = config.load([str(glance_conf), first, second])
    assert cfg.options.cache_max_size_gb == 5 and cfg.options.chunk_size_mb == 16


def test_store_weights_order_the_copies(glance_conf, tmp_path):
    extra = write(tmp_path, "w.conf", "[s3store]\nweight = 100\n[filestore]\nweight = 5\n")
    assert [s.name for s in config.load([str(glance_conf), extra]).stores] == ["s3store", "filestore"]
    bad = write(tmp_path, "bad.conf", "[s3store]\nweight = heavy\n")
    with pytest.raises(ConfigError, match=r"\[s3store\] weight = 'heavy'"):
        config.load([str(glance_conf), bad])


def test_legacy_single_store_layout(tmp_path):
    p = write(tmp_path, "g.conf", "[glance_store]\nstores = file,http\ndefault_store = file\nfilesystem_store_datadir = /srv/images\n")
    cfg = config.load([p])
    assert [(s.name, s.kind) for s in cfg.stores] == [("file", "file")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[imgfs]\ncache_max_size_gb = lots\n", "[imgfs] cache_max_size_gb = 'lots': expected a number >= 0.001"),
        ("[imgfs]\nchunk_size_mb = 0\n", "[imgfs] chunk_size_mb = '0': expected a whole number >= 1 and <= 64"),
        ("[imgfs]\nallow_other = maybe\n", "[imgfs] allow_other = 'maybe': expected true or false"),
        ("[imgfs]\ncache_dir = relative/dir\n", "[imgfs] cache_dir = 'relative/dir': expected an absolute path"),
        ("[imgfs]\ncache_max_size = 3\n", "[imgfs] cache_max_size: unknown option"),
        # a misspelt switch is an error even while fleet mode is off (it would stay off unseen)
        ("[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir=/x\n[fleet]\nenable = true\n",
         "[fleet] enable: unknown option"),
        ("[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir=/x\n[fleet]\nenabled = false\n"
         "min_image_gb = 1\n", "[fleet] min_image_gb: unknown option"),
        ("[imgfs\nx=1\n", "cannot parse INI"),
        ("[DEFAULT]\nenabled_backends = s3store\n", "is not name:type"),
        ("[DEFAULT]\nenabled_backends = s3store:s3\n", "no [s3store] section exists"),
        ("[DEFAULT]\nenabled_backends = s3store:s3\n[s3store]\ns3_store_host = h\n", "[s3store] s3_store_bucket is missing"),
        ("[DEFAULT]\nenabled_backends = a:swift\n", "no S3, file or cinder store configured"),
        ("[DEFAULT]\nenabled_backends = c:cinder\n[c]\ncinder_store_user_name = u\n", "[c] cinder_store_auth_address is missing"),
        ("[DEFAULT]\nenabled_backends = f:file\n[glance_store]\ndefault_backend = g\n[f]\nfilesystem_store_datadir=/x\n",
         "[glance_store] default_backend = 'g': not one of enabled_backends"),
    ],
)
def test_bad_values_name_file_section_option(tmp_path, text, expected):
    path = write(tmp_path, "bad.conf", text)
    with pytest.raises(ConfigError) as info:
        config.load([path])
    message = str(info.value)
    assert expected in message
    assert message.startswith(path)
    assert "\n" not in message


def test_bad_value_blamed_on_the_file_that_holds_it(tmp_path):
    bad = write(tmp_path, "bad.conf", "[imgfs]\ncache_max_count = -1\n")
    good = write(tmp_path, "good.conf", "[imgfs]\nchunk_size_mb = 2\n")
    with pytest.raises(ConfigError) as info:
        config.load([bad, good])
    assert str(info.value).startswith(bad + ": [imgfs] cache_max_count")


def test_secret_value_never_echoed(tmp_path):
    path = write(tmp_path, "c.conf", f"""
        [DEFAULT]
        enabled_backends = s:s3
        [s]
        s3_store_host = h
        s3_store_bucket = b
        s3_store_access_key = {ACCESS_KEY}
        s3_store_secret_key = {SECRET_KEY}
        s3_store_bucket_url_format = sideways
        """)
    with pytest.raises(ConfigError) as info:
        config.load([path])
    assert "s3_store_bucket_url_format" in str(info.value)
    assert SECRET_KEY not in str(info.value) and ACCESS_KEY not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load([str(tmp_path / "nope.conf")])
    with pytest.raises(ConfigError, match="is a directory"):
        config.load([str(tmp_path)])
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load([str(binary)])


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "imgfs", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    bad = write(tmp_path, "bad.conf", "[imgfs]\nchunk_size_mb = huge\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (["mount", str(mnt), "--config-file", bad], ["check-config", "--config-file", bad]):
        result = run_cli(*args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "config error" in lines[0] and bad in lines[0] and "chunk_size_mb" in lines[0]
        assert "Traceback" not in result.stderr


def test_cli_bad_mountpoint_exits_2(glance_conf, tmp_path):
    result = run_cli("mount", str(tmp_path / "missing"), "--config-file", str(glance_conf))
    assert result.returncode == 2
    assert "does not exist; create it with: mkdir -p" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2  # the cinder skip warning + the error


def test_cli_help_explains_every_option():
    top = run_cli("--help")
    assert top.returncode == 0 and "mount" in top.stdout and "Exit codes" in top.stdout
    mount = run_cli("mount", "--help")
    for option in ("--config-file", "--log-level", "--debug", "--allow-other", "MOUNTPOINT"):
        assert option in mount.stdout


def test_check_config_prints_no_secret(glance_conf):
    result = run_cli("check-config", "--config-file", str(glance_conf))
    assert result.returncode == 0, result.stderr
    assert "store s3store: type=s3 endpoint=http://127.0.0.1:7480 bucket=glance" in result.stdout
    assert SECRET_KEY not in result.stdout + result.stderr and ACCESS_KEY not in result.stdout + result.stderr


def test_a_cinder_store_without_the_cinder_extra_is_one_line_naming_the_extra(tmp_path):
    """As on a node where imgfs was installed without [cinder]: os_brick cannot be found."""
    conf = tmp_path / "c.conf"
    conf.write_text("[DEFAULT]\nenabled_backends = cs:cinder\n[cs]\ncinder_store_auth_address = http://127.0.0.1:1/v3\n"
                    "cinder_store_user_name = glance\ncinder_store_password = pw\ncinder_store_project_name = service\n"
                    f"[imgfs]\ncache_dir = {tmp_path}/cache\n")
    hide = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'os_brick': raise ModuleNotFoundError(name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from imgfs.cli import main\n"
            f"sys.exit(main(['check-config', '--config-file', {str(conf)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "store 'cs' (type cinder) needs imgfs's 'cinder' extra" in lines[0], result.stderr
    assert "pip install 'imgfs[cinder]'" in lines[0] and "Traceback" not in result.stderr


# ---- [fleet] -------------------------------------------------------------------------------------------

def fleet_conf(tmp_path, fleet: str) -> list[str]:
    for name in ("node.crt", "node.key", "ca.crt"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    path = tmp_path / "imgfs.conf"
    path.write_text(textwrap.dedent(f"""\
        [DEFAULT]
        enabled_backends = f:file
        [f]
        filesystem_store_datadir = {tmp_path}
        [imgfs]
        cache_dir = {tmp_path}/cache
        [fleet]
        """) + fleet.replace("DIR", str(tmp_path)))
    return [str(path)]


FLEET_OK = """\
enabled = true
mesh_listen = 198.18.0.1:8443
members = 198.18.0.1:8443, 198.18.0.2:8443
certfile = DIR/node.crt
keyfile = DIR/node.key
cafile = DIR/ca.crt
"""


def test_fleet_options_are_read_and_a_mount_keeps_them(tmp_path):
    cfg = config.load(fleet_conf(tmp_path, FLEET_OK))
    assert cfg.fleet is not None and cfg.fleet.members == ("198.18.0.1:8443", "198.18.0.2:8443")
    assert (cfg.fleet.local_port, cfg.fleet.gateway_port, cfg.fleet.min_image_mb) == (8085, 8089, 64)
    assert config.refuse_own_mount(cfg, str(tmp_path / "mnt")).fleet == cfg.fleet
    assert (cfg.fleet.timeout, cfg.fleet.connect_timeout, cfg.fleet.access_log) == (30.0, 5.0, None)
    assert config.load(fleet_conf(tmp_path, FLEET_OK.replace("enabled = true", "enabled = false"))).fleet is None


def test_fleet_members_file_one_per_line(tmp_path):
    (tmp_path / "members").write_text("# the mesh\n198.18.0.1:8443\n198.18.0.3:8443  # added\n\n")
    text = FLEET_OK.replace("members = 198.18.0.1:8443, 198.18.0.2:8443", "members_file = DIR/members")
    assert config.load(fleet_conf(tmp_path, text)).fleet.members == ("198.18.0.1:8443", "198.18.0.3:8443")


@pytest.mark.parametrize("change, expect", [
    (("mesh_listen = 198.18.0.1:8443\n", ""), "needs mesh_listen"),
    (("members = 198.18.0.1:8443, 198.18.0.2:8443\n", ""), "needs members"),
    (("members = 198.18.0.1:8443, 198.18.0.2:8443", "members = node-a:8443"), "[fleet] members = 'node-a:8443'"),
    (("cafile = DIR/ca.crt\n", ""), "needs cafile"),
    (("cafile = DIR/ca.crt", "cafile = DIR/nothing.crt"), "not a readable file"),
    (("members = 198.18.0.1:8443, 198.18.0.2:8443", "members_file = DIR/absent"), "members_file"),
    (("enabled = true", "enabled = true\nlocal_port = 8089"), "the same as local_port"),
    (("enabled = true", "enabled = true\nconnect_timeout = 0"), "[fleet] connect_timeout = '0'"),
    (("enabled = true", "enabled = true\naccess_log = mesh.log"), "[fleet] access_log = 'mesh.log'"),
])
def test_a_bad_fleet_section_is_one_line(tmp_path, change, expect):
    with pytest.raises(ConfigError) as info:
        config.load(fleet_conf(tmp_path, FLEET_OK.replace(*change)))
    assert expect in str(info.value) and "\n" not in str(info.value), info.value
