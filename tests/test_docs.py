"""The documentation: the MkDocs site builds with --strict (no broken link, no warning), the README stays
short, and the CLI reference generated from the parser covers every subcommand and every flag."""
from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from d2m_export.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _text(page: Path) -> str:
    """A built page's text: tags dropped, entities decoded (code blocks are split into highlighted spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def _subcommands(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def test_readme_is_short_and_keeps_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


def test_readme_links_resolve():
    """README links point into the repository (docs/, bench/results/): each must exist."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README links to {target}, which is not in the repository"


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    for page in ["stages/convert", "stages/train", "runtimes/onnx", "runtimes/gguf", "runtimes/executorch",
                 "runtimes/coreml", "studies", "reference/cli"]:
        assert (site / page / "index.html").is_file(), page
    # bench/results/ is published as it is in the repository, not copied into docs/
    assert (site / "results" / "heal_study" / "study" / "index.html").is_file()
    assert not (ROOT / "docs" / "results").exists()


def test_cli_reference_covers_every_subcommand_and_flag(site):
    text = _text(site / "reference" / "cli" / "index.html")
    parser = build_parser()
    subs = _subcommands(parser)
    assert subs
    for name, sub in subs.items():
        assert f"usage: d2m-export {name}" in text, f"subcommand {name!r} missing from the CLI reference"
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"{name} {flag} missing from the CLI reference"
    for action in parser._actions:          # the export flags used without a COMMAND
        for flag in action.option_strings:
            assert flag in text, f"{flag} missing from the CLI reference"
