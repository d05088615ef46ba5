"""MkDocs hooks (registered under `hooks:` in mkdocs.yml).

- The CLI reference is rendered at build time from the parser `d2m_export.cli.parser.build_parser()` builds,
  so it cannot drift from the code: every subcommand's usage and help, and the top-level export flags.
- The benchmark results in `bench/results/` (Markdown, plots, the HTML report) are published under
  `results/` without being copied into `docs/`: pages link to them as `results/...` relative paths,
  and `mkdocs build --strict` checks those links like any other.
"""
from __future__ import annotations

import argparse
import functools
import sys
import textwrap
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent          # the checkout whose CLI is documented
RESULTS = ROOT / "bench" / "results"
PUBLISHED = {".md", ".png", ".html"}                    # human-readable results; the JSON stays in the repository
CLI_MARKER = "<!-- cli-reference -->"
RESULTS_MARKER = "<!-- results-files -->"
WIDTH = 100                                             # help text wrapped the same on every machine


def _parser() -> argparse.ArgumentParser:
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))                   # this checkout's code, not an installed copy
    from d2m_export.cli.parser import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) for every subcommand, in the order the CLI defines them."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


class _Formatter(argparse.HelpFormatter):
    """argparse's own layout, except that a flag named in a help text is never split at its hyphens."""

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _help(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = functools.partial(_Formatter, width=WIDTH)
    if hasattr(parser, "color"):                        # Python 3.14+: no ANSI colours in the page
        parser.color = False
    return parser.format_help().rstrip()


def cli_reference() -> str:
    parser = _parser()
    subs = subcommands(parser)
    lines = ["| command | what it does |", "|---|---|",
             "| [`d2m-export --target ...`](#d2m-export) | export a model (no COMMAND) |"]
    lines += [f"| [`d2m-export {name}`](#d2m-export-{name}) | {text} |" for name, text, _ in subs]
    lines += ["", "## `d2m-export`", "", "Global options, and the export flags used when no COMMAND is given.", "",
              "```text", _help(parser), "```", ""]
    for name, text, sub in subs:
        lines += [f"## `d2m-export {name}`", "", text[:1].upper() + text[1:] + ".", "",
                  "```text", _help(sub), "```", ""]
    return "\n".join(lines)


def results_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in PUBLISHED)


def results_list(page_uri: str) -> str:
    """A list of the published results, linked relative to the page that holds the marker."""
    depth = page_uri.count("/")
    prefix = "../" * depth
    rows = []
    for path in results_files():
        if path.suffix != ".md":
            continue
        rel = path.relative_to(RESULTS).as_posix()
        title = next((line[2:].strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("# ")), rel)
        rows.append(f"- [`bench/results/{rel}`]({prefix}results/{rel}): {title}")
    return "\n".join(rows)


def on_files(files, config):
    for path in results_files():
        uri = "results/" + path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if RESULTS_MARKER in markdown:
        markdown = markdown.replace(RESULTS_MARKER, results_list(page.file.src_uri))
    return markdown


def on_serve(server, config, builder):
    server.watch(str(RESULTS))
    server.watch(str(ROOT / "d2m_export" / "cli"))
    return server
