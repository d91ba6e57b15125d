"""A model folder's promotion log: who made which version ``current``, when, and what it
replaced, and which version a roll-back returns to.

``<folder>/promotions.jsonl`` holds one JSON line per change, appended by
``artifact.promote`` (the CLI's ``models promote`` / ``models rollback``, ``train``, the web
view, a live calibration): ``at`` (Unix seconds), ``by`` (a person, or the component that
promoted), ``action`` (``promote`` or ``rollback``), ``version`` and ``previous``. A line
that cannot be read is skipped; the log only ever grows.

A roll-back undoes the latest promotion still standing: the log is replayed as a stack
(a promotion pushes its version, a roll-back pops back to the version it returned to), so
three promotions A, B, C then two roll-backs return to B, then to A.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LOG_FILE: Final = "promotions.jsonl"
Action = Literal["promote", "rollback"]


class Promotion(BaseModel):
    """One change of a folder's ``current``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float
    by: str = Field(min_length=1, max_length=64)
    action: Action
    version: str = Field(min_length=1, max_length=128)
    previous: str | None = Field(default=None, max_length=128)


def record(folder: Path, entry: Promotion) -> None:
    """Append ``entry`` to the folder's log (one write of one line: appends never mix)."""
    line = (entry.model_dump_json() + "\n").encode()
    fd = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_log(folder: Path) -> list[Promotion]:
    """Every readable entry of the folder's log, oldest first (none when there is no log)."""
    try:
        text = (folder / LOG_FILE).read_text(errors="replace")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entries.append(Promotion.model_validate_json(line))
        except (ValidationError, json.JSONDecodeError):
            continue
    return entries


def standing(log: list[Promotion]) -> list[str]:
    """The versions promoted and not rolled back, oldest first (pure)."""
    stack: list[str] = []
    for entry in log:
        if entry.action == "promote":
            if not stack and entry.previous is not None:
                stack.append(entry.previous)
            if not stack or stack[-1] != entry.version:
                stack.append(entry.version)
        else:
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
    return stack


def rollback_target(log: list[Promotion], current: str | None, versions: list[str]) -> str | None:
    """The version a roll-back from ``current`` returns to (pure; None: there is none).

    The one below ``current`` on the :func:`standing` stack that still exists; when the log
    does not end at ``current`` (promoted by an older version of factorywatch, or the log
    was lost), the newest version older than ``current``.
    """
    if current is None:
        return None
    stack = standing(log)
    if stack and stack[-1] == current:
        for version in reversed(stack[:-1]):
            if version in versions and version != current:
                return version
        return None
    older = [v for v in versions if v < current]
    return older[-1] if older else None
