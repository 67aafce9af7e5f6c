"""etc/imgfs.conf, the configuration the package installs as /etc/imgfs/imgfs.conf: every option imgfs
reads is in it, and each default it shows is the one imgfs applies."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from imgfs import config

REFERENCE = Path(__file__).resolve().parent.parent / "etc" / "imgfs.conf"
SOURCE = Path(config.__file__).read_text()


def shown(section: str | None = None) -> dict[str, str]:
    """option -> value of each '# option = value' line (of one section's part of the file)."""
    text = REFERENCE.read_text()
    if section is not None:
        text = text.split(f"\n[{section}]\n", 1)[1]
        text = re.split(r"^(?:# )?\[[a-z_]+\]$", text, maxsplit=1, flags=re.M)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^# ([a-z0-9_]+) =(.*)$", text, re.M)}


def test_every_option_imgfs_reads_is_in_the_reference_config():
    read = set(re.findall(r'sec\.(?:get|raw|required|number|integer|boolean|choice)\(\s*"([a-z0-9_]+)"', SOURCE))
    read |= {f.name for f in fields(config.ImgfsOptions)}
    assert read - {"default_store"}, "no option found in config.py: the pattern above is stale"
    missing = sorted(read - set(shown()) - {"default_store", "filesystem_store_datadirs"})
    assert not missing, f"etc/imgfs.conf lacks {missing}"


def test_the_imgfs_defaults_it_shows_are_the_defaults(tmp_path):
    values = shown("imgfs")
    options = {f.name for f in fields(config.ImgfsOptions)}
    lines = [f"{k} = {v}" for k, v in values.items() if k in options and v and k != "lock_path"]
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {tmp_path}\n"
                    "[imgfs]\n" + "\n".join(lines) + "\n")
    loaded = config.load([str(conf)]).options
    assert loaded == config.ImgfsOptions(), "a default shown in etc/imgfs.conf is not imgfs's"


def test_the_reference_config_as_shipped_names_no_store_and_says_so(tmp_path):
    try:
        config.load([str(REFERENCE)])
    except config.ConfigError as e:
        assert "no S3, file or cinder store configured" in str(e)
    else:
        raise AssertionError("the shipped configuration, all commented out, loaded as if it named a store")
