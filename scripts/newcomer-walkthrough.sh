#!/usr/bin/env bash
# The README from a fresh clone, timed: `make demo`, then the "With Docker" commands as printed.
#
#   scripts/newcomer-walkthrough.sh DATASET.csv [DIR]   # DIR: where to clone (default: a temp dir)
#   scripts/newcomer-walkthrough.sh --list              # the commands it runs, in order
#
# Clones this repository's HEAD into DIR (nothing beside it, so no ../shared dataset), copies
# the dataset into the clone's data/ as the README says for an offline machine, and runs, with
# a wall clock around each step:
#   1. `make demo` until its first verdict line, then Ctrl-C (SIGINT to its process group);
#      the first-use install of .venv is timed apart;
#   2. every command of the README's "With Docker" block, in order, as printed; the image
#      builds are timed apart (`docker compose build` first, then the printed `up -d --build`),
#      the web view is logged in to as `operator` until it shows a score for every machine,
#      `mosquitto_sub` stops after 3 messages (-C 3 -W 60), and the machine added with
#      `add-user` must have all its readings answered (the sensor's "answered N").
# Docker starts as on a machine with Debian's docker.io and no Compose plugin: DOCKER_CONFIG
# points at an empty folder, so `docker compose` does not answer until `make docker-prepare`
# provides it (--keep-docker-config: use yours). It refuses to run beside a `factorywatch`
# Compose project that already has containers or volumes (the ports and volumes are shared),
# and removes the stack it started, volumes included, at the end (--keep: leave them).
# --no-cache builds the images from scratch (the first build on a new machine; the base
# image and wheelhouse/ are make docker-prepare's, timed with it).
# Prints a table: step, command, seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

keep=0
build_flags=
keep_docker_config=0
list=0
args=()
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        --no-cache) build_flags=--no-cache ;;
        --keep-docker-config) keep_docker_config=1 ;;
        --list) list=1 ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done

say() { echo "walkthrough: $*" >&2; }

# The README's "With Docker" block: one command a line (continuations joined, trailing
# comments dropped); a line that is only a comment is kept as `#...` (the web view's).
docker_block() {
    awk '
        /^## With Docker/ { section = 1; next }
        section && /^## / { exit }
        section && /^```bash/ && !done { inblock = 1; next }
        inblock && /^```/ { inblock = 0; done = 1; next }
        inblock { print }
    ' "$1" | awk '
        { line = $0 }
        carry != "" { sub(/^ +/, "", line); line = carry " " line; carry = "" }
        /\\$/ { sub(/ *\\$/, "", line); carry = line; next }
        { print line }
    ' | sed -E 's/[[:space:]]+# .*$//; s/[[:space:]]+$//'
}

if [ "$list" = 1 ]; then
    echo "make demo"
    docker_block "$here/README.md"
    exit 0
fi

if [ "${#args[@]}" -lt 1 ] || [ ! -f "${args[0]}" ]; then
    say "usage: $0 DATASET.csv [DIR]   (the AI4I CSV: ai4i2020.csv or predictive_maintenance.csv)"
    exit 2
fi
dataset=$(cd "$(dirname "${args[0]}")" && pwd)/$(basename "${args[0]}")
dir=${args[1]:-$(mktemp -d /tmp/factorywatch-walkthrough.XXXXXX)/factorywatch}
if [ -e "$dir" ]; then
    say "$dir exists: give a new folder (the walkthrough starts from a fresh clone)"
    exit 2
fi

project=(--filter label=com.docker.compose.project=factorywatch)
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    if [ -n "$(docker ps -aq "${project[@]}")" ] || [ -n "$(docker volume ls -q "${project[@]}")" ]; then
        say "a 'factorywatch' Compose project already has containers or volumes here; stop it"
        say "first (its folder: docker compose down, -v for the volumes): same ports and names"
        exit 2
    fi
fi

if [ "$keep_docker_config" = 0 ]; then
    DOCKER_CONFIG=$(mktemp -d /tmp/factorywatch-walkthrough-docker.XXXXXX)
    export DOCKER_CONFIG
fi

rows=()
started_stack=0
demo_pid=
cleanup() {
    if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then
        kill -INT -- "-$demo_pid" 2>/dev/null || true
    fi
    if [ "$started_stack" = 1 ] && [ "$keep" = 0 ] && [ -d "$dir" ]; then
        # The volumes it created (it refused to start beside existing ones): the model,
        # history, broker and detector state of this walkthrough.
        say "removing the stack it started (docker compose down -v, untimed)"
        (cd "$dir" && docker compose down -v >/dev/null 2>&1) || true
    fi
    if [ "$keep_docker_config" = 0 ] && [ -n "${DOCKER_CONFIG:-}" ]; then
        rm -rf "$DOCKER_CONFIG"
    fi
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
sep=$'\x1f'   # between a row's fields: a command may hold any printable character
row() { rows+=("$1$sep$2$sep$3"); say "$(printf '%-34s %7s s  %s' "$1" "$3" "$2")"; }
log=$(dirname "$dir")/walkthrough-logs
mkdir -p "$log"

# Run one step in the clone, timed; its output goes to its log, the log's end on failure.
# $3, if given, is a check on that output (grep -q PATTERN) that must hold too.
step() {
    local name=$1 command=$2 check=${3:-} file t
    file="$log/$(echo "$1" | tr -c 'a-zA-Z0-9\n' '-').log"
    t=$(now)
    if ! (cd "$dir" && bash -c "$command") >"$file" 2>&1; then
        say "FAILED as printed: $command"
        tail -n 30 "$file" >&2
        exit 1
    fi
    if [ -n "$check" ] && ! grep -q -- "$check" "$file"; then
        say "FAILED: $command printed no \"$check\":"
        tail -n 30 "$file" >&2
        exit 1
    fi
    row "$name" "$command" "$(since "$t")"
}

# Poll $2 (a shell condition in the clone) up to $3 s; time from $4.
wait_for() {
    local name=$1 condition=$2 limit=$3 t=$4 deadline
    deadline=$(($(date +%s) + limit))
    until (cd "$dir" && bash -c "$condition") >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "FAILED: $name not within ${limit} s"
            exit 1
        fi
        sleep 0.5
    done
    row "$name" "(waited)" "$(since "$t")"
}

# -- a fresh clone, the dataset copied into data/ -----------------------------------------------
git clone -q "$here" "$dir"
cp "$dataset" "$dir/data/"
say "clone $dir ($(git -C "$dir" rev-parse --short HEAD)), dataset data/$(basename "$dataset")"
if (cd "$dir" && docker compose version) >/dev/null 2>&1; then
    say "note: \`docker compose\` already answers (--keep-docker-config?)"
else
    say "\`docker compose\` does not answer yet: as with docker.io and no Compose plugin"
fi

# -- make demo: install (first use), first verdict, Ctrl-C ---------------------------------------
t=$(now)
(cd "$dir" && exec setsid make demo) >"$log/make-demo.log" 2>&1 &
demo_pid=$!
installed=
first=
deadline=$(($(date +%s) + 900))
while [ -z "$first" ]; do
    if [ -z "$installed" ] && [ -f "$dir/.venv/.installed" ]; then
        installed=$(since "$t")
        t_demo=$(now)
    fi
    if grep -qE 'seq=[0-9]+ +(NORMAL|ALERT)' "$log/make-demo.log"; then
        first=$(since "${t_demo:-$t}")
    elif ! kill -0 "$demo_pid" 2>/dev/null; then
        say "FAILED as printed: make demo stopped before its first verdict:"
        tail -n 30 "$log/make-demo.log" >&2
        exit 1
    elif [ "$(date +%s)" -ge "$deadline" ]; then
        say "FAILED: make demo printed no verdict within 900 s"
        exit 1
    fi
    sleep 0.2
done
[ -n "$installed" ] && row "install .venv (first make only)" "make demo" "$installed"
row "make demo: first verdict" "make demo" "$first"
sleep 5
t=$(now)
kill -INT -- "-$demo_pid"
wait "$demo_pid" 2>/dev/null || true
demo_pid=
grep -q "demo stopped" "$log/make-demo.log" || { say "FAILED: Ctrl-C did not stop the demo"; exit 1; }
row "make demo: Ctrl-C stops all" "Ctrl-C" "$(since "$t")"
verdicts=$(grep -cE 'seq=[0-9]+ +(NORMAL|ALERT)' "$log/make-demo.log" || true)
say "the demo printed $verdicts verdicts in its terminal (log: $log/make-demo.log)"

# -- With Docker, command by command ---------------------------------------------------------------
web_check='
jar=$(mktemp); trap "rm -f $jar" EXIT
curl -sf -c "$jar" -o /dev/null --data-urlencode username=operator \
    --data-urlencode "password=$(cat secrets/operator.password)" http://127.0.0.1:18080/login
curl -sf -b "$jar" http://127.0.0.1:18080/api/machines | .venv/bin/python -c "
import json, sys
scored = {m[\"machine_id\"] for m in json.load(sys.stdin)[\"machines\"] if m.get(\"last_score\") is not None}
sys.exit(0 if {\"press-1\", \"lathe-2\", \"mill-3\"} <= scored else 1)"'
mapfile -t commands < <(docker_block "$dir/README.md")
for command in "${commands[@]}"; do
    [ -n "$command" ] || continue
    case "$command" in
        "make docker-prepare"*)
            if docker info >/dev/null 2>&1 \
                && ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
                step "base image build (apart)" "scripts/docker-base-image.sh"
            fi
            step "$command" "$command"
            ;;
        "docker compose up -d --build"*)
            step "image builds (apart)" "docker compose build${build_flags:+ $build_flags}"
            started_stack=1
            step "start the stack" "$command"
            # A pull attempt of an image the stack builds: offline, one Error line each.
            if grep -E '^ *[a-z0-9-]+ +Error' "$log/start-the-stack.log" >&2; then
                say "FAILED: \`$command\` printed errors (above)"
                exit 1
            fi
            t=$(now)
            ;;
        "# web view"*)
            wait_for "web view: every machine scored" "$web_check" 300 "$t"
            ;;
        mosquitto_sub*)
            step "mosquitto_sub: first 3 messages" "$command -C 3 -W 60"
            ;;
        *"add-user"*)
            step "add a machine" "$command"
            ;;
        *"sensor --machine-id weld-4"*)
            count=$(echo "$command" | sed -nE 's/.*--count ([0-9]+).*/\1/p')
            step "its readings scored" "$command" "answered ${count:-?},"
            ;;
        "docker compose restart detector"*)
            step "restart the detector" "$command"
            t=$(now)
            wait_for "verdicts again after the restart" \
                "mosquitto_sub -h 127.0.0.1 -p 18883 --cafile secrets/certs/ca.crt -u viewer -P \"\$(cat secrets/viewer.password)\" -t 'factory/alerts/+/+/verdict' -C 1 -W 5" 120 "$t"
            ;;
        "#"*) ;;
        *)
            step "$(echo "$command" | cut -c1-34)" "$command"
            ;;
    esac
done

# -- the table ------------------------------------------------------------------------------------
echo
echo "| step | command | seconds |"
echo "|---|---|---:|"
for r in "${rows[@]}"; do
    IFS=$sep read -r name command secs <<<"$r"
    echo "| $name | \`${command//|/\\|}\` | $secs |"
done
