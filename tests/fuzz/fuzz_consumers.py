"""Coverage-guided fuzzing of every consumer's decoder with atheris (libFuzzer): ``make fuzz``.

    python -m tests.fuzz.fuzz_consumers [CORPUS_DIR] [-max_total_time=60] [-runs=N]

The corpus directory is seeded with valid messages of every consumer when empty. A crash (an
exception other than ``PayloadError``, or a broken invariant) stops the run with a
non-zero exit and writes the input to ``crash-*`` for replay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["factorywatch"]):
    from tests.fuzz.consumers_target import check, seeds


def main(argv: list[str]) -> None:
    """Seed the corpus directories given, then fuzz until libFuzzer's limits."""
    for arg in argv[1:]:
        if not arg.startswith("-"):
            corpus = Path(arg)
            corpus.mkdir(parents=True, exist_ok=True)
            if not any(corpus.iterdir()):
                for i, seed in enumerate(seeds()):
                    (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
