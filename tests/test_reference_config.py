"""etc/imgfs.conf, the configuration the package installs as /etc/imgfs/imgfs.conf, and docs/configuration.md,
the reference in prose: every option imgfs reads is in each, and each default they give for [imgfs] (and
[fleet], [glance_catalog]) is the one imgfs applies."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from imgfs import config

REFERENCE = Path(__file__).resolve().parent.parent / "etc" / "imgfs.conf"
DOCUMENTED = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SOURCE = Path(config.__file__).read_text()


def options_read() -> set[str]:
    """Every option name config.py reads: its sec.get/raw/required/... calls, the options it reads in a
    loop over a tuple of names, and the fields of ImgfsOptions."""
    read = set(re.findall(r'sec\.(?:get|raw|required|number|integer|boolean|choice)\(\s*"([a-z0-9_]+)"', SOURCE))
    for names in re.findall(r"for option in \(([^)]*)\):", SOURCE):
        read |= set(re.findall(r'"([a-z0-9_]+)"', names))
    read |= {f.name for f in fields(config.ImgfsOptions)}
    assert read - {"default_store"}, "no option found in config.py: the pattern above is stale"
    return read


def documented() -> dict[str, list[tuple[str, str]]]:
    """'## heading' of docs/configuration.md -> (option, default cell) of each row of its option tables
    (rows ``| `option` ... | default | meaning |``)."""
    tables: dict[str, list[tuple[str, str]]] = {}
    heading = ""
    for line in DOCUMENTED.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif m := re.match(r"^\| `([a-z0-9_]+)`[^|]*\| ([^|]*) \|", line):
            tables.setdefault(heading, []).append((m[1], m[2].strip()))
    return tables


def literal(default: str) -> str | None:
    """The value a default cell gives: its leading `literal`; None for 'unset ...' and 'required ...'."""
    if default.startswith(("unset", "required")):
        return None
    m = re.match(r"^`([^`]*)`", default)
    assert m, f"docs/configuration.md: a default of {default!r}: write `value`, 'unset ...' or 'required ...'"
    return m[1]


def shown(section: str | None = None) -> dict[str, str]:
    """option -> value of each '# option = value' line (of one section's part of the file)."""
    text = REFERENCE.read_text()
    if section is not None:
        text = text.split(f"\n[{section}]\n", 1)[1]
        text = re.split(r"^(?:# )?\[[a-z_]+\]$", text, maxsplit=1, flags=re.M)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^# ([a-z0-9_]+) =(.*)$", text, re.M)}


def test_every_option_imgfs_reads_is_in_the_reference_config():
    missing = sorted(options_read() - set(shown()) - {"default_store", "filesystem_store_datadirs"})
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


def test_every_option_imgfs_reads_is_documented_once_per_section():
    tables = documented()
    rows = [option for table in tables.values() for option, _ in table]
    missing = sorted(options_read() - set(rows))
    assert not missing, f"docs/configuration.md has no table row for {missing}"
    for heading, table in tables.items():
        names = [option for option, _ in table]
        twice = sorted({n for n in names if names.count(n) > 1})
        assert not twice, f"docs/configuration.md, {heading!r}: {twice} documented more than once"


def test_the_imgfs_defaults_it_documents_are_the_defaults(tmp_path):
    table = dict(documented()["[imgfs]"])
    defaults = config.ImgfsOptions()
    assert set(table) == {f.name for f in fields(config.ImgfsOptions)}, \
        "the [imgfs] table of docs/configuration.md is not exactly ImgfsOptions' fields"
    values = {option: literal(default) for option, default in table.items()}
    for option in (o for o, v in values.items() if v is None):  # unset: imgfs has no value of its own for it
        assert getattr(defaults, option) in ("", -1), f"[imgfs] {option} is documented unset, but defaults to " \
                                                      f"{getattr(defaults, option)!r}"
    lines = [f"{k} = {v}" for k, v in values.items() if v is not None]
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {tmp_path}\n"
                    "[imgfs]\n" + "\n".join(lines) + "\n")
    loaded = config.load([str(conf)]).options
    wrong = {f.name: (getattr(loaded, f.name), getattr(defaults, f.name)) for f in fields(config.ImgfsOptions)
             if getattr(loaded, f.name) != getattr(defaults, f.name)}
    assert not wrong, f"docs/configuration.md documents these [imgfs] defaults wrongly (documented, actual): {wrong}"


def test_the_fleet_and_catalog_defaults_it_documents_are_the_defaults():
    tables = documented()
    for heading, cls in (("[fleet]", config.FleetConfig), ("[glance_catalog]", config.GlanceCatalogConfig)):
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        table = dict(tables[heading])
        assert set(defaults) <= set(table), f"{heading}: undocumented {set(defaults) - set(table)}"
        for option, default in table.items():
            value = literal(default)
            if option not in defaults:
                continue
            actual = defaults[option]
            if value is None:
                assert actual is None, f"{heading} {option} is documented unset, but defaults to {actual!r}"
            elif isinstance(actual, bool):
                assert value == str(actual).lower(), f"{heading} {option}: documented {value}, actual {actual}"
            elif isinstance(actual, (int, float)):
                assert float(value) == actual, f"{heading} {option}: documented {value}, actual {actual}"
            else:
                assert value == actual, f"{heading} {option}: documented {value!r}, actual {actual!r}"
