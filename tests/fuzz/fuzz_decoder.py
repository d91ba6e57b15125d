"""Coverage-guided fuzzing of the decoder with atheris (libFuzzer): ``make fuzz``.

    python -m tests.fuzz.fuzz_decoder [CORPUS_DIR] [-max_total_time=60] [-runs=N]

The corpus directory is seeded with valid readings and batches when empty. A crash (an
exception other than ``PayloadError``, or a broken invariant) stops the run with a
non-zero exit and writes the input to ``crash-*`` for replay.
"""

from __future__ import annotations

import sys

import atheris

from tests.fuzz.harness import fuzz

with atheris.instrument_imports(include=["factorywatch"]):
    from tests.fuzz.decoder_target import check, seeds


def main(argv: list[str]) -> None:
    """Fuzz this target (see the module docstring)."""
    fuzz(argv, check, seeds)


if __name__ == "__main__":
    main(sys.argv)
