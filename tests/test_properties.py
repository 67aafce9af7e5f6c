"""Properties that must hold for every input, not just the ones someone thought of (hypothesis).

- config: whatever a config file holds, loading it gives a Config or one ConfigError line naming the
  problem; ``imgfs check-config`` exits 2 with that one line, never a traceback; good values round-trip.
- a real mount (moto over HTTP, a kernel FUSE mount): odd names get the right errno and never hurt the
  daemon; reads at any offset and size, at and past EOF, give exactly the source's bytes.
- the chunk cache: whatever happens to its directory, a fresh cache opens and never returns wrong bytes.

Every example set is derandomized and database-less, so CI sees the same examples on every run.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import boto3
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgfs import config
from imgfs.cache import BLOCK, ChunkCache
from imgfs.errors import ConfigError
from imgfs.model import ChunkKey

from .conftest import (ACCESS_KEY, SECRET_KEY, Mount, drop_page_cache, is_mounted, sha256, sha256_file, start_mount,
                       write_config)

MiB = 1 << 20

PROFILE = settings(database=None, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


# ======================================================================================================
# Config files
# ======================================================================================================

@dataclass(frozen=True)
class Numeric:
    """One numeric [imgfs] option and the range it accepts (high None: no upper bound)."""

    name: str
    low: float
    high: float | None
    whole: bool


NUMERIC = (
    Numeric("cache_max_size_gb", 0.001, 1e9, False),
    Numeric("refresh_interval", 1, None, False),
    Numeric("negative_lookup_ttl", 0, None, False),
    Numeric("s3_connect_timeout", 0.1, 86400, False),
    Numeric("s3_read_timeout", 0.1, 86400, False),
    Numeric("attach_idle_timeout", 0, None, False),
    Numeric("attach_timeout", 0, None, False),
    Numeric("detach_deadline", 1, None, False),
    Numeric("cinder_api_timeout", 1, 86400, False),
    Numeric("cache_max_count", 1, None, True),
    Numeric("chunk_size_mb", 1, 64, True),
    Numeric("memory_cache_mb", 0, 65536, True),
    Numeric("prefetch_max_mb", 0, 65536, True),
    Numeric("backend_max_connections", 1, 256, True),
    Numeric("read_ahead_kb", 0, 1048576, True),
    Numeric("s3_max_attempts", 1, 20, True),
    Numeric("metrics_port", 0, 65535, True),
)
PATH_OPTIONS = ("cache_dir", "lock_path", "control_socket")
KNOWN_OPTIONS = frozenset(f.name for f in dataclasses.fields(config.ImgfsOptions))
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
RESERVED_SECTIONS = {"DEFAULT", "imgfs", "glance_store", "glance_catalog", "oslo_concurrency", "fs"}

BASE_STORE = "fs"
BASE = {
    "DEFAULT": {"enabled_backends": f"{BASE_STORE}:file"},
    "glance_store": {"default_backend": BASE_STORE},
    BASE_STORE: {"filesystem_store_datadir": "/var/lib/glance/images"},
    "imgfs": {"cache_dir": "/var/cache/imgfs-props"},
}


def test_the_option_table_matches_the_code():
    """Guards the tables above against drifting from ImgfsOptions (a typo would test nothing)."""
    assert {o.name for o in NUMERIC} | set(PATH_OPTIONS) <= KNOWN_OPTIONS


Sections = dict[str, dict[str, str]]


def render(sections: Sections) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) for name, opts in sections.items())


def with_changes(changes: Sections) -> str:
    """BASE with some options replaced or added (an option set to None is left out)."""
    merged = {name: dict(opts) for name, opts in BASE.items()}
    for name, opts in changes.items():
        merged.setdefault(name, {}).update(opts)
    return render({name: {k: v for k, v in opts.items() if v is not None} for name, opts in merged.items()})


def parses(parse: Callable[[str], object], text: str) -> bool:
    try:
        parse(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Case:
    """A malformed config and the words its one error line must contain."""

    content: bytes
    fragment: str
    warns: bool = False  # a skipped store says so in a WARNING line before the error
    files: tuple[tuple[str, bytes], ...] = ()  # helper files next to it; @DIR@ in content names their folder


def case(text: str, fragment: str, **kw) -> Case:
    return Case(text.encode(), fragment, **kw)


# One line of text as an INI value can hold it: no line breaks, no surrounding blanks.
one_line = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=24) \
    .map(str.strip).filter(bool)
identifier = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True)
store_name = identifier.filter(lambda n: n not in RESERVED_SECTIONS)


def below(low: float) -> st.SearchStrategy[float]:
    # filter, not exclude_max: hypothesis may offer -0.0 just under 0.0, and -0.0 >= 0 holds
    return st.floats(max_value=low, allow_nan=False, allow_infinity=False).filter(lambda v: v < low)


def above(high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=high, allow_nan=False, allow_infinity=False).filter(lambda v: v > high)


NON_FINITE = st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-INFINITY", "1e999", "-1e400"])


def bad_numeric(opt: Numeric) -> st.SearchStrategy[str]:
    parse = int if opt.whole else float
    choices = [NON_FINITE, below(opt.low).map(repr), one_line.filter(lambda t: not parses(parse, t))]
    if opt.high is not None:
        choices.append(above(opt.high).map(repr))
    if opt.whole:
        choices += [st.integers(max_value=int(opt.low) - 1).map(str),
                    st.floats(allow_nan=False, allow_infinity=False).map(repr)]  # "3.0" is not a whole number
        if opt.high is not None:
            choices.append(st.integers(min_value=int(opt.high) + 1).map(str))
    return st.one_of(choices)


def continued(value: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """An indented next line continues a value: the error must still be one line."""
    return st.builds(lambda v, more: f"{v}\n    {more}", value, one_line)


@st.composite
def bad_imgfs_value(draw) -> Case:
    opt = draw(st.sampled_from(NUMERIC))
    value = draw(st.one_of(bad_numeric(opt), continued(st.just(str(opt.low)))))
    if draw(st.booleans()):  # a duplicate [imgfs] section later in the file: its bad value wins
        text = with_changes({"imgfs": {opt.name: str(opt.low)}}) + f"[imgfs]\n{opt.name} = {value}\n"
    else:
        text = with_changes({"imgfs": {opt.name: value}})
    return case(text, f"[imgfs] {opt.name} = ")


@st.composite
def bad_imgfs_other(draw) -> Case:
    option, value = draw(st.one_of(
        st.tuples(st.just("allow_other"), one_line.filter(lambda t: t.lower() not in TRUE_WORDS + FALSE_WORDS)),
        st.tuples(st.sampled_from(PATH_OPTIONS), st.one_of(
            one_line.filter(lambda t: not t.startswith("/")),
            st.builds(lambda a, b: f"/{a}\x00{b}", identifier, identifier),  # no file system takes a NUL
        )),
        st.tuples(st.just("host"), one_line.filter(lambda t: not all(c.isalnum() or c in "-._" for c in t))),
        st.tuples(st.just("catalog"), one_line.filter(lambda t: t not in ("stores", "glance"))),
    ))
    return case(with_changes({"imgfs": {option: value}}), f"[imgfs] {option} = ")


@st.composite
def unknown_imgfs_option(draw) -> Case:
    option = draw(identifier.filter(lambda n: n not in KNOWN_OPTIONS))
    return case(with_changes({"imgfs": {option: draw(one_line)}}), f"[imgfs] {option}: unknown option")


@st.composite
def bad_enabled_backends(draw) -> Case:
    name = draw(store_name)
    kind = draw(st.sampled_from(["s3", "file", "cinder"]))
    unknown = draw(st.lists(st.tuples(store_name, identifier.filter(lambda k: k not in ("s3", "file", "cinder"))),
                            min_size=1, max_size=3, unique_by=lambda t: t[0]))
    bad_entry = draw(st.sampled_from([name, f":{kind}", f"{name}:", " : ", f"{name}{kind}"]))
    listed = ", ".join(f"{n}:{k}" for n, k in unknown)
    return draw(st.sampled_from([
        case(with_changes({"DEFAULT": {"enabled_backends": f"{BASE_STORE}:file, {name}:{kind}"}}),
             f"no [{name}] section exists"),
        case(with_changes({"DEFAULT": {"enabled_backends": f"{BASE_STORE}:file, {bad_entry}"}}), "is not name:type"),
        case(with_changes({"DEFAULT": {"enabled_backends": f"{BASE_STORE}:file, {BASE_STORE}:{kind}"}}), "appears twice"),
        case(with_changes({"DEFAULT": {"enabled_backends": listed}, "glance_store": {"default_backend": None}}),
             "no S3, file or cinder store configured", warns=True),
        case(with_changes({"glance_store": {"default_backend": name}}), "[glance_store] default_backend = "),
    ]))


S3_REQUIRED = ("s3_store_host", "s3_store_bucket", "s3_store_access_key", "s3_store_secret_key")
HOST_BREAKERS = " _!$&'()*+,;=%\"<>\\^`{|}~üé"  # none of these may appear in a host name


def s3_stanza(**overrides: str | None) -> dict[str, str | None]:
    return {"s3_store_host": "127.0.0.1:7480", "s3_store_bucket": "glance", "s3_store_access_key": ACCESS_KEY,
            "s3_store_secret_key": SECRET_KEY, **overrides}


bad_host = st.one_of(
    st.sampled_from(["http://", "https://", ":80", "ftp://host", "http://[::1", "http://h:port", "http://h:99999",
                     "http://-h-/", "http://" + "a" * 64, "h..h", "http://a b"]),
    st.builds(lambda a, bad, b, scheme: f"{scheme}{a}{bad}{b}", identifier, st.sampled_from(HOST_BREAKERS), identifier,
              st.sampled_from(["", "http://", "https://"])),
)
bad_region = st.one_of(
    st.sampled_from(["us east", "us/east-1", "-us", "us-", "123", "us_east_1", "us.east", "a" * 64]),
    # the breaker between two names: at the end, a space is stripped by the ini parser (a good region)
    st.builds(lambda a, bad, b: f"{a}{bad}{b}", identifier, st.sampled_from(HOST_BREAKERS + "./:"), identifier),
)
bad_weight = st.one_of(st.integers(max_value=-(2**31) - 1).map(str), st.integers(min_value=2**31).map(str), NON_FINITE,
                       one_line.filter(lambda t: not parses(int, t)))


@st.composite
def bad_s3_store(draw) -> Case:
    name = draw(store_name)
    missing = draw(st.sampled_from(S3_REQUIRED))
    option, value, fragment = draw(st.one_of(
        st.tuples(st.just(missing), st.sampled_from([None, ""]), st.just(f"[{name}] {missing} is missing")),
        st.tuples(st.just("s3_store_host"), bad_host, st.just(f"[{name}] s3_store_host = ")),
        st.tuples(st.just("s3_store_region_name"), bad_region, st.just(f"[{name}] s3_store_region_name = ")),
        st.tuples(st.just("weight"), bad_weight, st.just(f"[{name}] weight = ")),
        st.tuples(st.just("s3_store_bucket_url_format"),
                  one_line.filter(lambda t: t not in ("auto", "virtual", "subdomain", "path")),
                  st.just(f"[{name}] s3_store_bucket_url_format = ")),
        st.tuples(st.just("s3_store_cacert"), st.just("/nonexistent/ca.pem"), st.just(f"[{name}] s3_store_cacert = ")),
    ))
    return case(with_changes({"DEFAULT": {"enabled_backends": f"{BASE_STORE}:file, {name}:s3"},
                              name: s3_stanza(**{option: value})}), fragment)


CINDER_CREDENTIALS = {"cinder_store_auth_address": "http://127.0.0.1:5000/v3", "cinder_store_user_name": "glance",
                      "cinder_store_password": "secret-password", "cinder_store_project_name": "service"}


@st.composite
def bad_cinder_store(draw) -> Case:
    name = draw(store_name)
    backends = {"DEFAULT": {"enabled_backends": f"{BASE_STORE}:file, {name}:cinder"}}
    given_creds = draw(st.lists(st.sampled_from(sorted(CINDER_CREDENTIALS)), min_size=1, max_size=3, unique=True))
    partial = {k: CINDER_CREDENTIALS[k] for k in given_creds}
    return draw(st.sampled_from([
        case(with_changes({**backends, name: partial}), f"[{name}] cinder_store_"),
        case(with_changes({**backends, name: {**CINDER_CREDENTIALS, "cinder_store_auth_address": "keystone:5000"}}),
             f"[{name}] cinder_store_auth_address = "),
        # the only store is a cinder store without credentials: skipped (a warning), so none is left
        case(with_changes({"DEFAULT": {"enabled_backends": f"{name}:cinder"}, "glance_store": {"default_backend": None},
                           name: {"cinder_volume_type": "images"}}), "no S3, file or cinder store configured", warns=True),
        # a keyring that is no text: secrets are read from it, so it must fail here, not later
        Case(with_changes({**backends, name: {**CINDER_CREDENTIALS, "rbd_keyring_file": "@DIR@/keyring"}}).encode(),
             f"[{name}] rbd_keyring_file = ", files=(("keyring", b"[client.cinder]\n\tkey = \xff\xfe\x00\x81\n"),)),
    ]))


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"])


@st.composite
def not_utf8(draw) -> Case:
    text = with_changes({}).encode()
    at = draw(st.integers(0, len(text)))
    return Case(text[:at] + draw(INVALID_UTF8) + text[at:], "not UTF-8")


@st.composite
def unparsable(draw) -> Case:
    return draw(st.sampled_from([
        case("cache_dir = /var/cache/x\n" + with_changes({}), "cannot parse INI"),  # an option before any section
        case(with_changes({}) + "[imgfs]\n" + draw(identifier) + "\n", "cannot parse INI"),  # a line without '='
        case(with_changes({}) + "[imgfs\n", "cannot parse INI"),
    ]))


MALFORMED = st.one_of(bad_imgfs_value(), bad_imgfs_other(), unknown_imgfs_option(), bad_enabled_backends(),
                      bad_s3_store(), bad_cinder_store(), not_utf8(), unparsable())


def materialize(c: Case, folder: Path) -> Path:
    for name, data in c.files:
        (folder / name).write_bytes(data)
    path = folder / "imgfs.conf"
    path.write_bytes(c.content.replace(b"@DIR@", os.fsencode(folder)))
    return path


def load_error(paths: list[Path]) -> str:
    """The ConfigError message of loading ``paths``; fails the test if they load or raise anything else."""
    with pytest.raises(ConfigError) as info:
        config.load([str(p) for p in paths])
    return str(info.value)


def assert_one_line_about(message: str, path: Path, fragment: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


@examples(400)
@given(MALFORMED)
def test_every_malformed_config_is_one_config_error_line(c: Case):
    with tempfile.TemporaryDirectory() as d:
        path = materialize(c, Path(d))
        assert_one_line_about(load_error([path]), path, c.fragment)


@examples(400)
@given(st.sampled_from(NUMERIC).flatmap(lambda opt: st.tuples(st.just(opt), bad_numeric(opt))))
def test_every_bad_number_is_refused(drawn: tuple[Numeric, str]):
    """Each numeric option on its own, so each meets non-finite, too small and too large values."""
    opt, value = drawn
    with tempfile.TemporaryDirectory() as d:
        path = materialize(case(with_changes({"imgfs": {opt.name: value}}), ""), Path(d))
        assert_one_line_about(load_error([path]), path, f"[imgfs] {opt.name} = ")


@examples(150)
@given(st.one_of(st.binary(max_size=300), st.text(st.characters(exclude_categories=("Cs",)), max_size=300).map(str.encode)))
def test_arbitrary_bytes_are_a_config_error(content: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "imgfs.conf"
        path.write_bytes(content)
        message = load_error([path])
    assert "\n" not in message and message.startswith(f"{path}: "), message


# Lines an INI file could hold, good and bad mixed: sections (known, odd, unclosed), options (known and
# unknown, any value), continuations, comments.
ini_line = st.one_of(
    st.sampled_from(sorted(RESERVED_SECTIONS)).map(lambda s: f"[{s}]"),
    one_line.map(lambda s: f"[{s}]"),
    one_line.map(lambda s: f"[{s}"),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(sorted(KNOWN_OPTIONS | {"enabled_backends", "default_backend",
                                                                                  "filesystem_store_datadir"})),
              st.one_of(one_line, NON_FINITE, st.sampled_from(["fs:file", "fs", "/tmp", "-1", "0", ""]))),
    st.builds(lambda k, v: f"{k}: {v}", identifier, one_line),
    one_line.map(lambda s: "    " + s),
    one_line.map(lambda s: "# " + s),
    one_line,
    st.just(""),
)


@examples(300)
@given(st.lists(ini_line, max_size=12))
def test_garbage_ini_loads_or_fails_in_one_line(lines: list[str]):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "imgfs.conf"
        path.write_text("\n".join(lines) + "\n")
        try:
            config.load([str(path)])
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{path}: "), str(e)


def bad_path(kind: str, folder: Path) -> tuple[Path, str]:
    """A --config-file that cannot be read, and the words the error must use."""
    if kind == "missing":
        return folder / "nope.conf", "no such config file"
    if kind == "directory":
        return folder, "is a directory"
    if kind == "symlink loop":
        (folder / "loop.conf").symlink_to("loop.conf")
        return folder / "loop.conf", os.strerror(errno.ELOOP)
    if kind == "under a file":
        (folder / "file").write_text("[imgfs]\n")
        return folder / "file" / "imgfs.conf", os.strerror(errno.ENOTDIR)
    assert kind == "name too long"
    return folder / ("x" * 300), os.strerror(errno.ENAMETOOLONG)


BAD_PATHS = ("missing", "directory", "symlink loop", "under a file", "name too long")


@pytest.mark.parametrize("kind", BAD_PATHS)
def test_unreadable_config_file_is_one_config_error_line(tmp_path, kind):
    """Not a property: these few ways a path can fail are all tried, in process and via the CLI."""
    path, fragment = bad_path(kind, tmp_path)
    assert_one_line_about(load_error([path]), path, fragment)


def check_config(*paths: Path) -> subprocess.CompletedProcess:
    args = [a for p in paths for a in ("--config-file", str(p))]
    return subprocess.run([sys.executable, "-m", "imgfs", "check-config", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})


def assert_cli_one_error(result: subprocess.CompletedProcess, path: Path, fragment: str, warns: bool) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    assert result.stdout == "", output  # nothing "checked" is printed for a config that failed
    lines = result.stderr.splitlines()
    errors = [line for line in lines if " ERROR imgfs: " in line]
    assert len(errors) == 1, output
    assert f"config error: {path}: " in errors[0] and fragment in errors[0], output
    others = [line for line in lines if line not in errors]
    assert all(" WARNING " in line for line in others) if warns else not others, output


@examples(25)
@given(st.one_of(MALFORMED, st.binary(max_size=200).map(lambda b: Case(b, ""))))
def test_check_config_exits_2_with_one_line(c: Case):
    with tempfile.TemporaryDirectory() as d:
        path = materialize(c, Path(d))
        result = check_config(path)
        assert_cli_one_error(result, path, c.fragment, c.warns)


@pytest.mark.parametrize("kind", BAD_PATHS)
def test_check_config_on_an_unreadable_file_exits_2_with_one_line(tmp_path, kind):
    path, fragment = bad_path(kind, tmp_path)
    assert_cli_one_error(check_config(path), path, fragment, warns=False)


# ---- good configs round-trip ---------------------------------------------------------------------------

def good_numeric(opt: Numeric) -> st.SearchStrategy[tuple[str, float]]:
    if opt.whole:
        return st.integers(int(opt.low), int(opt.high if opt.high is not None else 10**12)).map(lambda v: (str(v), v))
    low = 64 / 1024 if opt.name == "cache_max_size_gb" else opt.low  # must hold one chunk of up to 64 MiB
    high = opt.high if opt.high is not None else 1e12
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False).map(lambda v: (repr(v), v))
    integral = st.integers(int(low) + 1, int(min(high, 1e6))).map(lambda v: (str(v), float(v)))  # "5" for 5.0
    return st.one_of(floats, integral)


segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}", fullmatch=True).filter(lambda s: s not in (".", ".."))
abs_path = st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
GOOD_OTHER = {
    "allow_other": st.sampled_from(TRUE_WORDS + FALSE_WORDS).flatmap(
        lambda w: st.sampled_from([w, w.upper(), w.title()]).map(lambda t: (t, w in TRUE_WORDS))),
    "host": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True).map(lambda h: (h, h)),
    **{name: abs_path.map(lambda p: (p, p)) for name in PATH_OPTIONS},
}
GOOD = {**{o.name: good_numeric(o) for o in NUMERIC}, **GOOD_OTHER}


@dataclass(frozen=True)
class GoodStore:
    name: str
    kind: str
    weight: int | None
    host: str = ""
    bucket: str = ""
    region: str | None = None
    datadir: str = ""

    def stanza(self) -> dict[str, str]:
        opts = ({"filesystem_store_datadir": self.datadir} if self.kind == "file" else
                {"s3_store_host": self.host, "s3_store_bucket": self.bucket, "s3_store_access_key": ACCESS_KEY,
                 "s3_store_secret_key": SECRET_KEY, "s3_store_bucket_url_format": "path"})
        if self.region:
            opts["s3_store_region_name"] = self.region
        if self.weight is not None:
            opts["weight"] = str(self.weight)
        return opts


host_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = st.lists(host_label, min_size=1, max_size=3).map(".".join)
good_store = st.one_of(
    st.builds(GoodStore, name=store_name, kind=st.just("file"), weight=st.none() | st.integers(-(2**31), 2**31 - 1),
              datadir=abs_path),
    st.builds(GoodStore, name=store_name, kind=st.just("s3"), weight=st.none() | st.integers(-100, 100),
              host=st.builds(lambda scheme, h, port: f"{scheme}{h}{port}", st.sampled_from(["", "http://", "https://"]),
                             hostname, st.sampled_from(["", ":80", ":7480", ":65535"])),
              bucket=st.from_regex(r"[a-z0-9][a-z0-9.-]{2,20}", fullmatch=True),
              region=st.none() | st.from_regex(r"[a-z]{2}-[a-z]{2,9}-[1-9]", fullmatch=True)),
)


@st.composite
def good_config(draw):
    """(files' texts, expected [imgfs] values, stores, default store); earlier files and earlier duplicate
    sections hold decoy values that later ones override, as --config-file merging and Glance allow."""
    values = draw(st.dictionaries(st.sampled_from(sorted(GOOD)), st.just(None), max_size=len(GOOD)))
    values = {name: draw(GOOD[name]) for name in values}
    if values.get("chunk_size_mb", ("", 8))[1] > values.get("cache_max_size_gb", ("", 20.0))[1] * 1024:
        del values["chunk_size_mb"]
    stores = draw(st.lists(good_store, min_size=1, max_size=4, unique_by=lambda s: s.name))
    default = draw(st.none() | st.sampled_from([s.name for s in stores]))
    files: list[list[str]] = [[] for _ in range(draw(st.integers(1, 3)))]
    for name, (text, _) in values.items():
        where = draw(st.integers(0, len(files) - 1))
        same_section = []
        for _ in range(draw(st.integers(0, 2))):  # decoys: good values on their own, overridden later
            decoy, into = f"{name} = {draw(GOOD[name])[0]}\n", draw(st.integers(0, where))
            if into == where:  # a duplicate option in the same section
                same_section.append(decoy)
            else:  # a duplicate [imgfs] section in an earlier file
                files[into].append("[imgfs]\n" + decoy)
        files[where].append("[imgfs]\n" + "".join(same_section) + f"{name} = {text}\n")
    head = [f"[DEFAULT]\nenabled_backends = {', '.join(f'{s.name}:{s.kind}' for s in stores)}\n"]
    if default:
        head.append(f"[glance_store]\ndefault_backend = {default}\n")
    head += [render({s.name: s.stanza()}) for s in stores]
    return ["".join(head + files[0])] + ["".join(f) for f in files[1:]], values, stores, default


@examples(200)
@given(good_config())
def test_good_configs_load_and_round_trip(drawn):
    texts, values, stores, default = drawn
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"{i}.conf" for i in range(len(texts))]
        for path, text in zip(paths, texts):
            path.write_text(text)
        cfg = config.load([str(p) for p in paths])
    assert cfg.files == tuple(map(str, paths))
    for name, (_, expected) in values.items():
        assert getattr(cfg.options, name) == expected, name
    untouched = {f.name for f in dataclasses.fields(config.ImgfsOptions)} - set(values)
    assert all(getattr(cfg.options, n) == getattr(config.ImgfsOptions(), n) for n in untouched)
    # docs/openstack.md: highest weight first, then the default backend, then declaration order
    order = sorted(range(len(stores)), key=lambda i: (-(stores[i].weight or 0), stores[i].name != default, i))
    assert [s.name for s in cfg.stores] == [stores[i].name for i in order]
    for got in cfg.stores:
        want = next(s for s in stores if s.name == got.name)
        assert (got.kind, got.weight) == (want.kind, want.weight or 0)
        if want.kind == "file":
            assert got.datadir == want.datadir
        else:
            endpoint = want.host if "://" in want.host else "http://" + want.host
            assert (got.endpoint_url, got.bucket, got.region_name, got.addressing_style) == \
                (endpoint, want.bucket, want.region, "path")
            assert (got.access_key, got.secret_key) == (ACCESS_KEY, SECRET_KEY)


# ======================================================================================================
# A real mount: odd names and reads at any offset
# ======================================================================================================

SMALL_ID = "5a11a2b4-0000-4000-8000-00000000000a"  # a few hundred KiB: every chunk boundary lies past EOF
MULTI_ID = "3c4d5e6f-0000-4000-8000-00000000000b"  # crosses two 1 MiB chunk boundaries, ends mid-chunk
STORE = "s3store"


@dataclass
class Served:
    mount: Mount
    images: dict[str, bytes]

    @property
    def root(self) -> Path:
        return self.mount.path

    def children(self, parent: str) -> set[str] | None:
        """What the directory ``parent`` holds (None: it does not exist on this mount)."""
        return {"": {"images", "stores"}, "stores": {STORE}, "images": set(self.images),
                f"stores/{STORE}": set(self.images)}.get(parent)


@pytest.fixture(scope="module")
def served(moto_url, tmp_path_factory):
    """One mount for the whole module: hypothesis runs many examples against it, and a module-scoped
    fixture is set up once, not per example. On moto only: these properties are of the FUSE layer
    (names, offsets, sizes of preads), which sees the same chunks whatever server sent them; the
    S3 data path itself runs on moto and RGW (test_s3_data_path, test_mount, the fault rows)."""
    work = tmp_path_factory.mktemp("props-mount")
    images = {SMALL_ID: random.Random(1).randbytes(384 * 1024 + 5), MULTI_ID: random.Random(2).randbytes(2 * MiB + 777)}
    s3 = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                      region_name="us-east-1")
    bucket = "glance-props-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=bucket)
    for key, data in images.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    cfg = write_config(work / "imgfs.conf", s3_url=moto_url, bucket=bucket, cache_dir=work / "cache")
    m = start_mount(work / "mnt", cfg, work / "mnt.log", work / "cache")
    try:
        yield Served(m, images)
        assert m.stop() == 0, m.log()
        assert not is_mounted(m.path)
        assert "Traceback" not in m.log(), m.log()
    finally:
        if not m.stopped:
            m.stop()
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", str(m.path)], check=False)


def assert_still_serving(s: Served) -> None:
    assert s.mount.proc.poll() is None, s.mount.log()
    for image_id, data in s.images.items():
        path = s.root / "images" / image_id
        drop_page_cache(path)
        assert sha256_file(path) == sha256(data), image_id
    assert "Traceback" not in s.mount.log(), s.mount.log()


def no_slash_or_nul(b: bytes) -> bool:
    return b"/" not in b and b"\0" not in b


def component(b: bytes) -> bytes:
    """Random bytes made a path component (filtering would throw most long ones away)."""
    return b.replace(b"/", b"%").replace(b"\0", b"\x01")


def is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def legal_name(b: bytes) -> bool:
    """A name a lookup can carry: '.' and '..' are resolved by the kernel (tested on their own)."""
    return 0 < len(b) <= 255 and b not in (b".", b"..") and no_slash_or_nul(b)


odd_names = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\0"), min_size=1, max_size=80).map(str.encode),
    st.text(st.sampled_from(" \n\t\r\\'\"*?[]{}~$`é漢🙂\u200b\u202e"), min_size=1, max_size=40).map(str.encode),
    st.builds(lambda n, c: c * n, st.integers(200, 255), st.sampled_from([b"x", b"."])),  # long but legal
    st.builds(lambda n: "é".encode() * n + b"x", st.integers(120, 127)),  # 255 bytes in multi-byte characters
    st.binary(min_size=1, max_size=255).map(component).filter(lambda b: not is_utf8(b)),
    st.binary(min_size=1, max_size=255).map(component),
    st.sampled_from([SMALL_ID.upper().encode(), SMALL_ID.encode() + b" ", b" " + MULTI_ID.encode(), b"images",
                     STORE.encode(), b"...", b"-", b"~", b"*", b"%00", b"\\", SMALL_ID.encode()]),
).filter(legal_name)
too_long = st.binary(min_size=256, max_size=3000).map(component)
PARENTS = ("", "images", "stores", f"stores/{STORE}", "by-name")


def expected_errno(s: Served, parent: str, name: bytes) -> int | None:
    """None: the path exists. by-name/ exists only with the Glance catalog, so here it is ENOENT itself."""
    children = s.children(parent)
    if children is None:
        return errno.ENOENT
    if len(name) > 255:
        return errno.ENAMETOOLONG
    return None if is_utf8(name) and name.decode() in children else errno.ENOENT


def outcome(call: Callable[[], object]) -> int | None:
    try:
        result = call()
    except OSError as e:
        return e.errno
    if isinstance(result, int):  # a file descriptor
        os.close(result)
    return None


def assert_lookup(s: Served, parent: str, name: bytes) -> None:
    path = os.path.join(os.fsencode(s.root), os.fsencode(parent), name)
    want = expected_errno(s, parent, name)
    for what, call in (("stat", lambda: os.stat(path)), ("open", lambda: os.open(path, os.O_RDONLY))):
        got = outcome(call)
        assert got == want, f"{what} {path!r}: {errno.errorcode.get(got, got)}, expected {errno.errorcode.get(want, want)}"


@pytest.mark.mount
def test_odd_names_get_the_right_errno_and_never_hurt_the_daemon(served):
    @examples(250)
    @given(parent=st.sampled_from(PARENTS), name=odd_names)
    @example(parent="images", name=SMALL_ID.encode())  # the model's "exists" side, on every run
    @example(parent=f"stores/{STORE}", name=MULTI_ID.encode())
    @example(parent="", name=b"stores")
    @example(parent="images", name=b"\xff\xfe")
    @example(parent="images", name=b"a\nb")
    @example(parent="images", name=b"x" * 255)
    def lookup(parent: str, name: bytes) -> None:
        assert_lookup(served, parent, name)

    lookup()
    assert_still_serving(served)


@pytest.mark.mount
def test_too_long_names_under_a_missing_directory_are_enoent(served):
    @examples(20)
    @given(name=too_long)
    def lookup(name: bytes) -> None:
        assert_lookup(served, "by-name", name)

    lookup()
    assert_still_serving(served)


@pytest.mark.mount
def test_too_long_names_are_enametoolong(served):
    @examples(20)
    @given(parent=st.sampled_from([p for p in PARENTS if p != "by-name"]), name=too_long)
    def lookup(parent: str, name: bytes) -> None:
        assert_lookup(served, parent, name)

    lookup()
    assert_still_serving(served)


@pytest.mark.mount
def test_dot_and_dotdot_are_the_directories_themselves(served):
    for parent in ("images", f"stores/{STORE}", "stores"):
        here = served.root / parent
        assert os.stat(os.path.join(here, ".")).st_ino == os.stat(here).st_ino
        assert os.stat(os.path.join(here, "..")).st_ino == os.stat(here.parent).st_ino


def around(points: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return st.builds(lambda p, d: max(0, p + d), points, st.integers(-1, 1))


def read_plan(data_len: int) -> st.SearchStrategy[tuple[int, int]]:
    last = data_len + 3 * MiB
    boundaries = st.one_of(st.integers(0, last // MiB).map(lambda k: k * MiB), st.just(data_len))  # chunks, EOF
    offset = st.one_of(st.integers(0, last), around(boundaries))
    size = st.one_of(st.integers(0, 3 * MiB), st.integers(0, 4096), around(st.integers(0, 3).map(lambda k: k * MiB)))
    return st.tuples(offset, size)


@st.composite
def reads(draw, images: tuple[str, ...], lengths: tuple[int, ...]):
    i = draw(st.integers(0, len(images) - 1))
    return (images[i], *draw(read_plan(lengths[i])), draw(st.booleans()))


@pytest.mark.mount
def test_pread_at_any_offset_returns_exactly_the_source(served):
    ids = tuple(served.images)

    @examples(120)
    @given(reads(ids, tuple(len(served.images[i]) for i in ids)))
    def read(plan) -> None:
        image_id, offset, size, cold = plan
        data = served.images[image_id]
        path = served.root / "images" / image_id
        if cold:  # else the kernel's page cache may answer: both must be exact
            drop_page_cache(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        want = data[offset:offset + size]
        assert len(got) == len(want) and got == want, f"pread({size}, {offset}) of {len(data)} bytes"

    read()
    assert_still_serving(served)


# ======================================================================================================
# The chunk cache's directory is its index: corrupt it, reopen, and never get wrong bytes
# ======================================================================================================

CHUNK = 3 * BLOCK + 123  # several verification blocks, not a block multiple


def source(key: ChunkKey) -> bytes:
    """The true bytes of a chunk; the last chunk of each image is short."""
    size = CHUNK if key.index < 2 else CHUNK // 3 + key.index
    return random.Random(f"{key.image_id}/{key.version}/{key.index}").randbytes(size)


KEYS = tuple(ChunkKey("s", image, version, CHUNK, index)
             for image, version in (("img-a", "v1"), ("img-a", "v2"), ("img-b", "v1")) for index in range(3))
IMAGES = sorted({k.image_id for k in KEYS})


def image_dirs(root: Path) -> list[Path]:
    chunks = root / "chunks"
    return sorted(p for p in chunks.iterdir() if p.is_dir() and not p.is_symlink()) if chunks.is_dir() else []


def chunk_files(root: Path) -> list[Path]:
    """Whatever sits where chunk files belong (files, or what damage made of them)."""
    return sorted(p for d in image_dirs(root) for p in d.iterdir())


def pick(seq: list[Path], i: int) -> Path | None:
    return seq[i % len(seq)] if seq else None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
pins_content = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(st.tuples(json_scalars, json_scalars), min_size=1, max_size=3).map(lambda v: json.dumps(v).encode()),
    st.lists(st.tuples(st.sampled_from(["s", "t"]), st.sampled_from(IMAGES + ["other"])))  # well-formed pins
    .map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)
file_name = st.one_of(
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", st.text("0123456789abcdef", min_size=1, max_size=16),
              st.sampled_from([str(CHUNK), "0", "1", "٣"]), st.sampled_from(["0", "1", "2", "9", "²"])),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\0"), min_size=1, max_size=30)
    .filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255),
)


@dataclass(frozen=True)
class Damage:
    """One thing done to the cache directory; ``target`` and ``other`` pick entries by index (modulo)."""

    kind: str
    target: int = 0
    other: int = 0
    at: float = 0.5
    data: bytes = b""
    name: str = ""

    def apply(self, root: Path) -> None:
        try:
            self._apply(root)
        except OSError:
            pass  # this damage does not fit what earlier ones left (a name taken, a file gone): skip it

    def _apply(self, root: Path) -> None:
        files, dirs = chunk_files(root), image_dirs(root)
        victim, other, folder = pick(files, self.target), pick(files, self.other), pick(dirs, self.other)
        pins = root / ("pinned.json.tmp" if self.at < 0.3 else "pinned.json")
        if self.kind == "pins":
            remove(root / "pinned.json")
            (root / "pinned.json").write_bytes(self.data)
        elif self.kind == "pins to dir":
            remove(pins)
            pins.mkdir()
        elif self.kind == "pins to symlink":
            remove(pins)
            pins.symlink_to(self.name if self.at < 0.6 else "/etc/passwd")
        elif self.kind in ("stray file", "stray dir", "stray symlink"):
            where = [root, root / "chunks", root / "tmp", *dirs][self.target % (3 + len(dirs))]
            path = where / self.name
            if where.is_dir() and not path.exists() and not path.is_symlink():
                if self.kind == "stray file":
                    path.write_bytes(self.data)
                elif self.kind == "stray dir":
                    path.mkdir()
                else:
                    path.symlink_to(other if other is not None and self.at < 0.5 else "/etc/passwd")
        elif self.kind == "image dir to file" and folder is not None:
            remove(folder)
            folder.write_bytes(self.data)
        elif self.kind == "image dir to symlink" and folder is not None and len(dirs) > 1:
            target = pick([d for d in dirs if d != folder], self.target)
            remove(folder)
            folder.symlink_to(target)
        elif victim is None or not victim.is_file() or victim.is_symlink():
            return
        elif self.kind == "truncate":
            os.truncate(victim, int(victim.stat().st_size * self.at))
        elif self.kind == "extend":
            os.truncate(victim, victim.stat().st_size + 1 + int(self.at * 10 * MiB))
        elif self.kind == "flip":
            raw = bytearray(victim.read_bytes())
            if raw:
                raw[min(int(len(raw) * self.at), len(raw) - 1)] ^= self.data[0] if self.data and self.data[0] else 1
                victim.write_bytes(raw)
        elif self.kind == "random":
            victim.write_bytes(self.data)
        elif self.kind == "copy other" and other is not None and other.is_file():
            victim.write_bytes(other.read_bytes())
        elif self.kind == "swap names" and other is not None and other != victim:
            tmp = victim.with_name(".swap")
            victim.rename(tmp)
            other.rename(victim)
            tmp.rename(other)
        elif self.kind == "rename":
            dest = victim.with_name(self.name)
            if not dest.exists():
                victim.rename(dest)
        elif self.kind == "move to other image" and folder is not None and folder != victim.parent:
            victim.rename(folder / victim.name)
        elif self.kind == "delete":
            victim.unlink()
        elif self.kind == "to dir":
            victim.unlink()
            victim.mkdir()
        elif self.kind == "to symlink":
            victim.unlink()
            victim.symlink_to(other if other is not None and other != victim and self.at < 0.5 else "/etc/passwd")


FILE_DAMAGE = ("truncate", "extend", "flip", "random", "copy other", "swap names", "rename", "move to other image",
               "delete", "to dir", "to symlink")
TREE_DAMAGE = ("pins to dir", "pins to symlink", "stray file", "stray dir", "stray symlink", "image dir to file",
               "image dir to symlink")


def damage_of(kinds: st.SearchStrategy[str], data: st.SearchStrategy[bytes]) -> st.SearchStrategy[Damage]:
    return st.builds(Damage, kind=kinds, target=st.integers(0, 20), other=st.integers(0, 20), at=st.floats(0, 1),
                     data=data, name=file_name)


damage = st.one_of(damage_of(st.sampled_from(FILE_DAMAGE), st.binary(max_size=300)),
                   damage_of(st.just("pins"), pins_content),
                   damage_of(st.sampled_from(TREE_DAMAGE), st.binary(max_size=300)))


def new_cache(root: Path, max_count: int = 1000) -> ChunkCache:
    return ChunkCache(str(root), max_bytes=1 << 30, max_count=max_count, memory_bytes=0)


async def fill(root: Path, pinned: list[str]) -> None:
    cache = new_cache(root)
    await cache.open()
    assert cache.disk_ok
    for key in KEYS:
        await cache.put(key, source(key), remember=False)
    for image in pinned:
        await cache.pin("s", image)


async def read_back(cache: ChunkCache, ranges: list[tuple[float, float]]) -> None:
    """Every read is a miss or exactly the source's bytes."""
    for key in KEYS:
        data = source(key)
        for a, b in [(0.0, 1.0), *ranges]:
            start = min(int(a * len(data)), len(data) - 1)
            end = max(start + 1, int(b * len(data)))
            got = await cache.read(key, start, end, len(data))
            assert got is None or bytes(got) == data[start:end], (key, start, end)


@examples(150)
@given(pinned=st.lists(st.sampled_from(IMAGES), unique=True), before=st.lists(damage, min_size=1, max_size=6),
       after=st.lists(damage, max_size=3), ranges=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=3),
       max_count=st.sampled_from([1000, 5, 1]))
def test_a_damaged_cache_opens_and_never_returns_wrong_bytes(pinned, before, after, ranges, max_count):
    """The cache keeps no index apart from its directory (and pinned.json): whatever that holds after a
    fill, a fresh cache opens on it, and every read is a miss or exactly the bytes that were filled."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "cache"
        trio.run(fill, root, pinned)
        for dmg in before:
            dmg.apply(root)

        async def reopen() -> None:
            cache = new_cache(root, max_count)
            await cache.open()  # never raises, whatever the directory holds
            await read_back(cache, ranges)
            for dmg in after:  # the directory changes under a running cache, after it verified some heads
                dmg.apply(root)
            await read_back(cache, ranges)
            # pins from a damaged pinned.json must not break pinning (or the listing 'imgfs status' shows)
            await cache.pin("s", "img-a")
            await cache.pin("s", "img-b", False)
            assert all(isinstance(s, str) and isinstance(i, str) for s, i in cache.pinned)
            for key in KEYS:  # refilled over whatever is left (a directory may now block a name): still exact
                await cache.put(key, source(key), remember=False)
            await read_back(cache, ranges)

        trio.run(reopen)
