"""The one way a fuzz target runs under atheris: seed empty corpus folders, then fuzz."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import atheris


def fuzz(argv: list[str], check: Callable[[bytes], None], seeds: Callable[[], list[bytes]]) -> None:
    """Seed the corpus directories given (when empty), then fuzz until libFuzzer's limits."""
    for arg in argv[1:]:
        if not arg.startswith("-"):
            corpus = Path(arg)
            corpus.mkdir(parents=True, exist_ok=True)
            if not any(corpus.iterdir()):
                for i, seed in enumerate(seeds()):
                    (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(argv, check)
    atheris.Fuzz()
