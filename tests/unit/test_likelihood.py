"""The anomaly likelihood step: a burst of high scores stands out, a lasting level is learnt."""

from __future__ import annotations

import numpy as np

from factorywatch.model.pipeline import (
    LIKELIHOOD_EVERY,
    LIKELIHOOD_LONG,
    Likelihood,
    likelihood_for,
    likelihood_scores,
)


def _prior(rng: np.random.Generator) -> Likelihood:
    """The likelihood step started on 400 ordinary training scores (mean 0.5, sd 0.02)."""
    return likelihood_for(rng.normal(0.5, 0.02, 400))


def test_a_burst_of_high_scores_is_unlikely_and_ordinary_scores_are_not() -> None:
    """Ten scores 0.1 above the training level give a likelihood score above 3 (once in a
    thousand), while ordinary scores stay mostly below 2."""
    rng = np.random.default_rng(0)
    spec = _prior(rng)
    scores = rng.normal(0.5, 0.02, 300)
    scores[200:210] += 0.1
    out = likelihood_scores(spec, scores)
    assert out[209] > 3.0
    assert np.mean(out[:200] > 2.0) < 0.05


def test_a_lasting_new_level_becomes_the_norm_after_the_long_window_turns_over() -> None:
    """Scores that move to a new level and stay there are unlikely at first and ordinary
    once the long window holds mostly the new level (re-estimated every 100 readings)."""
    rng = np.random.default_rng(1)
    spec = _prior(rng)
    scores = rng.normal(0.56, 0.02, 3 * LIKELIHOOD_LONG)
    out = likelihood_scores(spec, scores)
    assert np.mean(out[10:LIKELIHOOD_EVERY] > 3.0) > 0.9
    assert np.mean(out[-LIKELIHOOD_LONG:] > 2.0) < 0.05


def test_the_prior_is_bounded_and_starts_the_distribution() -> None:
    """Training scores longer than the long window are thinned to it, evenly over time."""
    spec = likelihood_for(np.arange(5000, dtype=np.float64))
    assert len(spec.prior) == LIKELIHOOD_LONG
    assert spec.prior[0] < 10.0
    assert spec.prior[-1] > 4990.0


def test_evaluate_compare_pairs_each_per_run_configuration_with_the_likelihood() -> None:
    """``evaluate --compare`` adds the per-run configurations with the likelihood flipped,
    each under its own name, and ``--likelihood`` reaches the main configuration's spec."""
    from factorywatch.cli import _evaluation_configs, build_parser  # noqa: PLC0415
    from factorywatch.model.fitspec import DEFAULT_PRESET  # noqa: PLC0415

    for flag, main in (("--no-likelihood", False), ("--likelihood", True)):
        args = build_parser().parse_args(["evaluate", "--nab", "x", "--compare", flag])
        configs = _evaluation_configs(args)
        assert configs[0].spec.likelihood is main
        assert len({c.name for c in configs}) == len(configs)
        flipped = [c for c in configs if c.spec.likelihood is not main]
        assert {c.spec.preset for c in flipped} == {DEFAULT_PRESET, "point"}
        assert {c.spec.family for c in flipped} == {"iforest", "pca"}


def test_block_moments_give_the_long_windows_mean_and_spread() -> None:
    """The "normal" estimate keeps block moments, not values, yet judges each reading by the
    mean and standard deviation of the last ``long`` short means, as a list would (a direct
    computation over the values, re-estimated every ``every`` readings)."""
    rng = np.random.default_rng(2)
    spec = likelihood_for(rng.normal(0.5, 0.02, 640), estimate="normal")
    scores = np.concatenate([rng.normal(0.5, 0.02, 700), rng.normal(0.6, 0.05, 900)])
    out = likelihood_scores(spec, scores)
    history = list(spec.prior)
    centre, spread = float(np.mean(history)), float(np.std(history))
    expected = []
    recent: list[float] = []
    for n, score in enumerate(scores.tolist(), start=1):
        recent = [*recent, score][-spec.short :]
        level = float(np.mean(recent))
        z = (level - centre) / max(spread, 0.1 * float(np.std(spec.prior)))
        expected.append(z)
        history.append(level)
        if n % spec.every == 0:
            window = history[-spec.long :]
            centre, spread = float(np.mean(window)), float(np.std(window))
    from factorywatch.model.pipeline import _tail_score  # noqa: PLC0415 - the one scale

    assert np.allclose(out, [_tail_score(z) for z in expected], rtol=1e-9, atol=1e-9)
