"""The README's promises, run as written: every Python block, in order, in one namespace, from a
directory that holds the repository's examples/ (as the quick start does); and every `m3` command
of its command list exists with the options it shows."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m3compile.cli import app

README = Path(__file__).parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "the README has no Python block"
    (tmp_path / "examples").symlink_to(README.parent / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    # what the block promises, checked
    assert namespace["kb"].manifest.counts["references"] == namespace["result"].manifest.counts["references"] > 0
    assert namespace["m"].keys.shape[0] == len(namespace["kb"].spec.memory_layers)
    assert namespace["hits"] and namespace["faults"] == []
    assert namespace["answer"].strip().startswith("Emrys Viandane")


def test_every_listed_command_exists_with_its_options():
    listing = blocks("")[0]
    runner = CliRunner()
    for line in listing.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("m3 "):
            continue
        words = shlex.split(line)
        r = runner.invoke(app, [words[1], "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (line, r.output)
        for opt in (w.strip("[]").split("=")[0] for w in words[2:] if w.strip("[]").startswith("-")):
            assert opt in r.output, (line, opt)
