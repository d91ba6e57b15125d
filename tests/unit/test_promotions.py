"""The promotion log's replay (pure): which version a roll-back returns to."""

from __future__ import annotations

from factorywatch.model.promotions import Promotion, rollback_target, standing


def _p(action: str, version: str, previous: str | None = None) -> Promotion:
    return Promotion.model_validate(
        {"at": 0.0, "by": "t", "action": action, "version": version, "previous": previous}
    )


def test_standing_replays_promotions_and_rollbacks() -> None:
    """Promotions push, roll-backs pop back to their target; a first promotion over an
    unlogged version keeps that one below it; a repeated promotion is one entry."""
    log = [_p("promote", "b", "a"), _p("promote", "c", "b"), _p("promote", "c", "c")]
    assert standing(log) == ["a", "b", "c"]
    assert standing([*log, _p("rollback", "b", "c")]) == ["a", "b"]
    assert standing([*log, _p("rollback", "b", "c"), _p("promote", "d", "b")]) == ["a", "b", "d"]


def test_rollback_target_skips_deleted_versions_and_falls_back_to_older() -> None:
    """A version deleted from the folder is skipped; a log not ending at ``current`` falls
    back to the newest older version; nothing current, nothing to return to."""
    log = [_p("promote", "a"), _p("promote", "b", "a"), _p("promote", "c", "b")]
    assert rollback_target(log, "c", ["a", "b", "c"]) == "b"
    assert rollback_target(log, "c", ["a", "c"]) == "a"
    assert rollback_target(log, "x", ["a", "b", "c", "x"]) == "c"
    assert rollback_target(log, None, ["a"]) is None
    assert rollback_target([], "a", ["a"]) is None
