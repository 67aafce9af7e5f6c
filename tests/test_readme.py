"""The configuration examples of the README and docs/ are copy-paste safe: every imgfs config block
(```ini) passes ``imgfs check-config`` with no warning, and no block for imgfs or for another service
(```conf) holds a trailing comment, which neither imgfs nor oslo.config strips. And CI runs the
README's test command."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]  # the README, then docs/ by name


def blocks(kind: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block whose info string is ``kind`` in the README and docs/,
    indentation removed; ``where`` is ``file:line`` of the opening fence."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
            if m:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                if m.group(2) == kind:
                    found.append((f"{doc.relative_to(REPO)}:{i + 1}", textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"))
                i = end
            i += 1
    return found


INI = blocks("ini")
CONF = blocks("conf")
STORES = next(text for _, text in INI if "enabled_backends" in text)  # the first stores example


def test_the_docs_have_config_blocks_to_check():
    assert len(INI) >= 4 and len(CONF) >= 3
    assert any(where.startswith("README.md:") for where, _ in INI), "the README shows no configuration"
    assert len({where.split(":")[0] for where, _ in INI + CONF}) >= 3, "config blocks of docs/ were not collected"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^## Two commands .*?```\n.*?```\n.*?```\n(.+?)\n```", README.read_text(), re.S | re.M)
    assert command and command[1].startswith("./.ci/setup --for-tests"), "the README's test command is not found"
    assert command[1] in (REPO / ".ci" / "run").read_text().splitlines(), f".ci/run does not run {command[1]!r}"


@pytest.mark.parametrize("where, text", INI + CONF, ids=[where for where, _ in INI + CONF])
def test_no_config_example_holds_a_trailing_comment(where, text):
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.read_string(text)
    for section in parser.sections():
        for option, value in parser.items(section):
            assert not re.search(r"\s[#;]", value), f"{where}: [{section}] {option} = {value!r}"


@pytest.mark.parametrize("where, text", INI, ids=[where for where, _ in INI])
def test_every_imgfs_config_example_passes_check_config(tmp_path, where, text):
    files = []
    if "enabled_backends" not in text:  # an [imgfs] or [glance_catalog] snippet: beside the first stores example
        (tmp_path / "stores.conf").write_text(STORES)
        files.append(tmp_path / "stores.conf")
    (tmp_path / "example.conf").write_text(text + f"\n[imgfs]\ncache_dir = {tmp_path}/cache\n"
                                           if "[imgfs]" not in text else text.replace(
                                               "[imgfs]\n", f"[imgfs]\ncache_dir = {tmp_path}/cache\n", 1))
    files.append(tmp_path / "example.conf")
    args = [a for f in files for a in ("--config-file", str(f))]
    result = subprocess.run([sys.executable, "-m", "imgfs", "check-config", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"{where}:\n{result.stderr}"
    assert "WARNING" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_check_config_warns_of_an_inline_comment_without_showing_the_value(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = s3store:s3\n[s3store]\ns3_store_host = http://127.0.0.1:1\n"
                    f"s3_store_access_key = AKIA\ns3_store_secret_key = s3cr3t   # the key\ns3_store_bucket = b\n"
                    f"[imgfs]\ncache_dir = {tmp_path}/cache ; here\n")
    result = subprocess.run([sys.executable, "-m", "imgfs", "check-config", "--config-file", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "inline comment" in line]
    assert len(warned) == 2, result.stderr
    assert any("[s3store] s3_store_secret_key" in w for w in warned) and any("[imgfs] cache_dir" in w for w in warned)
    assert "s3cr3t" not in result.stderr + result.stdout
