#!/usr/bin/env bash
# `make test` after its installs: lint, types and the whole suite, in three phases.
#
#   phase 1  the compose tests (tests/compose: Docker engine, base image, wheelhouse, one image
#            build, both stacks) in the background, while the foreground runs ruff, mypy and
#            the pure tests (tests/unit, tests/property: no process, broker or clock to race);
#   phase 2  the integration tests that bound no wall-clock time, on $TEST_WORKERS
#            pytest-xdist workers (default 3): each test starts its own brokers on free ports,
#            under its own topic root, tmp dir and PostgreSQL schema, so they do not meet; a
#            module's tests stay on one worker (--dist loadfile: its module fixtures are built
#            once), and the workers share one trained model (tests/conftest.py);
#   phase 3  the tests marked `timing` (fault injection, benchmarks, kill-9 recovery bounds,
#            "stops within seconds", sensor fencing) alone on the machine, one at a time.
# The compose tests spend most of their time waiting on containers, so overlapping them with
# CPU-bound pure tests costs neither phase its robustness; the timing-sensitive tests never
# share the machine with anything. Every phase runs even when an earlier one failed (one CI
# log shows all failures); a lint or type error stops at once. The last line sums the phases.
# Each phase prints its slowest tests (--durations). Extra pytest options: PYTEST_ADDOPTS.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
LOGS=$(mktemp -d /tmp/factorywatch-tests.XXXXXX)
trap 'rm -rf "$LOGS"' EXIT
DURATIONS=--durations=25
TEST_WORKERS=${TEST_WORKERS:-3}

say() { echo "test-suite: $*"; }

# pytest's closing line ("= 3 failed, 835 passed, 1 skipped in 59.18s =") -> "passed failed
# skipped"; errors count as failed. A phase that printed no closing line counts one failure.
counts() {
    local line passed failed errors skipped
    line=$(grep -E '^=+ .* in [0-9.]+s' "$1" | tail -n 1)
    [ -n "$line" ] || { echo "0 1 0"; return; }
    passed=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    failed=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    errors=$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    skipped=$(grep -oE '[0-9]+ skipped' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    echo "$passed $((failed + errors)) $skipped"
}

started=$SECONDS
say "phase 1: compose tests in the background (log at the end of this phase)"
# set -m: the background job keeps SIGINT (a script's background jobs otherwise ignore it).
set -m
"$BIN/pytest" -p no:cacheprovider "$DURATIONS" tests/compose >"$LOGS/compose.log" 2>&1 &
compose_pid=$!
set +m

stop_compose() {
    # SIGINT: pytest stops like on Ctrl-C, running the fixtures' teardown (compose down -v).
    kill -INT "$compose_pid" 2>/dev/null
    wait "$compose_pid"
    cat "$LOGS/compose.log"
}
# Its own process group does not see a Ctrl-C on `make test`: pass it on.
trap 'say "interrupted: stopping the compose tests"; stop_compose; exit 130' INT TERM

lint_failed=0
"$BIN/ruff" check . || lint_failed=1
"$BIN/ruff" format --check . || lint_failed=1
"$BIN/mypy" || lint_failed=1
"$BIN/lint-imports" || lint_failed=1
# The documentation site: --strict makes every warning an error, broken links and anchors too
# (mkdocs.yml `validation:`); site/ is a build product, kept out of the tree's way.
"$BIN/mkdocs" build --strict --quiet --site-dir "$LOGS/site" || lint_failed=1
if [ "$lint_failed" -ne 0 ]; then
    say "lint, types or docs failed: stopping the compose tests"
    stop_compose
    exit 1
fi

"$BIN/pytest" "$DURATIONS" tests/unit tests/property 2>&1 | tee "$LOGS/pure.log"
pure_rc=${PIPESTATUS[0]}
say "pure tests done at $((SECONDS - started)) s; waiting for the compose tests"
wait "$compose_pid"
compose_rc=$?
cat "$LOGS/compose.log"
say "phase 1 done at $((SECONDS - started)) s"

INTEGRATION=(--ignore=tests/compose --ignore=tests/unit --ignore=tests/property)
say "phase 2: integration tests, $TEST_WORKERS at a time"
"$BIN/pytest" "$DURATIONS" "${INTEGRATION[@]}" -m "not timing" \
    -n "$TEST_WORKERS" --dist loadfile 2>&1 | tee "$LOGS/parallel.log"
parallel_rc=${PIPESTATUS[0]}
say "phase 2 done at $((SECONDS - started)) s"

say "phase 3: timing-sensitive tests (marked timing), alone"
"$BIN/pytest" "$DURATIONS" "${INTEGRATION[@]}" -m timing 2>&1 | tee "$LOGS/timing.log"
timing_rc=${PIPESTATUS[0]}
say "phase 3 done at $((SECONDS - started)) s"

passed=0 failed=0 skipped=0
for phase in pure compose parallel timing; do
    read -r p f s < <(counts "$LOGS/$phase.log")
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
done
say "exit codes: pure $pure_rc, compose $compose_rc, parallel $parallel_rc, timing $timing_rc"
echo "suite: $passed passed, $failed failed, $skipped skipped"
[ "$pure_rc" -eq 0 ] && [ "$compose_rc" -eq 0 ] && [ "$parallel_rc" -eq 0 ] && [ "$timing_rc" -eq 0 ]
