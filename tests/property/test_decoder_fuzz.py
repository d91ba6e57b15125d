"""The decoder's fuzz target (tests/fuzz/decoder_target.py) under hypothesis (the atheris run:
tests/integration/test_fuzz_decoder.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.decoder_target import check, seeds


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes replaced, inserted or removed."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if op == "insert" or at == len(data):
            data.insert(at, byte)
        elif op == "set":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600) | mutated())
def test_decoder_invariants_hold_for_any_input(data: bytes) -> None:
    """Any bytes on any topic: a dead letter with a known reason, or a reading that agrees
    with its topic, its sender's registration, the clock limits and the model's channels."""
    check(data)


def test_seeds_are_accepted_or_rejected_as_designed() -> None:
    """The fuzz seeds themselves pass the target (the corpus starts from valid input)."""
    for seed in seeds():
        check(seed)
