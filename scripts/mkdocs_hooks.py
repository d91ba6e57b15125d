"""MkDocs hooks: the CLI reference generated from the argparse parsers, and reports/ served.

``mkdocs.yml`` names this file under ``hooks:``. The CLI page is rebuilt from
``factorywatch.cli.build_parser()`` on every build, so it cannot drift from the code; the
measured figures stay where the commands write them (``reports/``) and the site links to them
there instead of keeping copies.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
REPORT_SUFFIXES = (".md", ".png", ".json")
CLI_PAGE = "reference/cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.items())
    return found


def _section(path: str, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    out = [f"{'#' * depth} `{path}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser):
        out += _section(f"{path} {name}", sub, min(depth + 1, 4))
    return out


def cli_reference() -> str:
    """The page: every subcommand's ``--help``, as argparse prints it, at a fixed width."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it
    from factorywatch.cli import build_parser  # noqa: PLC0415 - after COLUMNS is set

    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "Every role is a subcommand of `factorywatch`; each has `--help`. This page is generated",
        "from the argument parsers at every build (`scripts/mkdocs_hooks.py`).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for name, sub in _subcommands(parser):
        lines += _section(f"factorywatch {name}", sub, 2)
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    """Add the generated CLI page and every report (figures, plots) under ``reports/``."""
    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    for path in sorted(REPORTS.iterdir()):
        if path.suffix in REPORT_SUFFIXES:
            files.append(
                File(
                    f"reports/{path.name}",
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
