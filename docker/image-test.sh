#!/usr/bin/env bash
# `make image-test`: build the CPU image with buildah (vfs storage, no Docker daemon) from a
# debootstrapped Debian base, run the server in it against the machine's Redis, and check it end to end:
# /ready, one streamed completion, a primed session that survives stopping the container (SIGTERM,
# clean exit within the grace period) and starting a new one from the image (identical greedy
# continuation), a non-root server process. Prints the build time and the image size.
#
# Environment: IMAGE_TEST_STORE_URL (default redis://127.0.0.1:6379/12), TORCH_VERSION (2.13.0),
# TORCH_WHEEL (a torch CPU wheel; default: found through the machine's pip configuration),
# KEEP_IMAGE=1 keeps the containers' logs in $LOG_DIR. Under CI=true a missing tool or Redis fails.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
IMAGE="${IMAGE:-localhost/retserve:cpu}"
BASE="${RETSERVE_BASE_IMAGE:-localhost/retserve-base:bookworm}"
STORE_URL="${IMAGE_TEST_STORE_URL:-redis://127.0.0.1:6379/12}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
GRACE_S=25 # > 2 x RETSERVE_SHUTDOWN_TIMEOUT_S (10): the stop grace period of compose and k8s
bah=(buildah --storage-driver vfs)

fail() { echo "image-test: FAIL: $*" >&2; exit 1; }
skip() {
    [ "${CI:-}" = "true" ] && fail "$* (required under CI=true)"
    echo "image-test: SKIP: $*" >&2
    exit 0
}
for tool in buildah debootstrap curl; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (make system-deps)"
done
redis_host_port=${STORE_URL#*://}
redis_host_port=${redis_host_port%%/*}
redis_host_port=${redis_host_port##*@}
(exec 3<>"/dev/tcp/${redis_host_port%:*}/${redis_host_port##*:}") 2>/dev/null ||
    skip "no Redis at $STORE_URL (set IMAGE_TEST_STORE_URL)"

LOG_DIR=$(mktemp -d /tmp/retserve-image-test.XXXXXX)
ctr="" runner="" server_pid=""
cleanup() { # the server process (known, or named in its log), its buildah run, the container
    set +e # best effort: a step that fails (a process already gone) must not skip the rest
    if [ -n "$runner" ]; then
        [ -n "$server_pid" ] || server_pid=$(sed -n -E 's/^server pid ([0-9]+) .*/\1/p' "$LOG_DIR"/server-*.log | tail -1)
        [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null
        sleep 1
        kill -KILL "$runner" 2>/dev/null
        wait "$runner" 2>/dev/null
    fi
    [ -n "$ctr" ] && "${bah[@]}" rm "$ctr" >/dev/null 2>&1
    [ "${KEEP_IMAGE:-0}" = 1 ] || rm -rf "$LOG_DIR"
}
trap cleanup EXIT

# ---- base image and the torch wheel ----------------------------------------------------------------
bash docker/base.sh
wheel="${TORCH_WHEEL:-}"
if [ -z "$wheel" ]; then # the machine's pip configuration: find-links dirs and file:// indexes
    dirs=$(python3 -m pip config list 2>/dev/null | sed -n -E "s/^[^=]*\.(find-links|extra-index-url|index-url)='(.*)'$/\2/p" |
        tr ' ' '\n' | sed -n -E 's#^(file://)?(/.*)$#\2#p' | sort -u || true)
    for d in $dirs; do
        [ -d "$d" ] || continue
        wheel=$(find "$d" -maxdepth 2 -name "torch-${TORCH_VERSION}+cpu-cp311-*.whl" -print -quit)
        [ -n "$wheel" ] && break
    done
fi
if [ -n "$wheel" ]; then
    echo "image-test: torch wheel $wheel"
    find docker/wheels -name 'torch-*.whl' ! -name "$(basename "$wheel")" -delete
    [ -f "docker/wheels/$(basename "$wheel")" ] || ln "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
else
    echo "image-test: no local torch ${TORCH_VERSION}+cpu wheel; the build downloads it"
fi

# ---- build -------------------------------------------------------------------------------------------
old_id=$("${bah[@]}" images -q "$IMAGE" 2>/dev/null || true)
b0=$(date +%s)
"${bah[@]}" bud --isolation chroot --network host --format docker --quiet \
    -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VARIANT=cpu \
    --build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg TORCH_CPU_INDEX= -t "$IMAGE" . >"$LOG_DIR/build.log" 2>&1 ||
    { tail -40 "$LOG_DIR/build.log" >&2; fail "the image did not build"; }
build_s=$(($(date +%s) - b0))
new_id=$("${bah[@]}" images -q "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then "${bah[@]}" rmi "$old_id" >/dev/null 2>&1 || true; fi
size=$("${bah[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)

# ---- run ---------------------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$port"

start() { # a new container from the image, the server in it in the background; waits for /ready
    ctr=$("${bah[@]}" from "$IMAGE")
    local log="$LOG_DIR/server-$1.log"
    : >"$log"
    "${bah[@]}" run --isolation chroot --network host -e RETSERVE_PORT="$port" -e RETSERVE_HOST=127.0.0.1 \
        -e RETSERVE_STORE_URL="$STORE_URL" -e RETSERVE_NUM_THREADS=1 "$ctr" -- \
        sh -c 'echo "server pid $$ uid $(id -u)"; exec retserve-server' >"$log" 2>&1 &
    runner=$!
    for _ in $(seq 600); do
        server_pid=$(sed -n -E 's/^server pid ([0-9]+) .*/\1/p' "$log" || true)
        [ -n "$server_pid" ] && break
        sleep 0.1
    done
    [ -n "$server_pid" ] || fail "the server did not start in the container: $(cat "$log")"
    local uid
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$server_pid/status")
    [ "$uid" != 0 ] || fail "the server runs as root"
    echo "image-test: container $1: server pid $server_pid runs as uid $uid"
    for _ in $(seq 900); do
        curl -sf "$URL/ready" >/dev/null && return 0
        kill -0 "$runner" 2>/dev/null || fail "the server exited before it was ready: $(tail -20 "$log")"
        sleep 0.2
    done
    fail "the server was not ready within 180 s: $(tail -20 "$log")"
}

stop() { # SIGTERM the server; it must exit cleanly within the grace period
    kill -TERM "$server_pid"
    for _ in $(seq $((GRACE_S * 10))); do
        kill -0 "$runner" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$runner" 2>/dev/null && fail "the server did not exit within ${GRACE_S}s of SIGTERM"
    local rc=0 log="$LOG_DIR/server-$1.log"
    wait "$runner" || rc=$?
    # uvicorn re-raises SIGTERM once it has shut down (so supervisors see the signal): buildah then
    # reports "exited on terminated"; a clean stop is that after "Application shutdown complete."
    if [ "$rc" != 0 ]; then
        grep -q "Application shutdown complete." "$log" && grep -q "subprocess exited on terminated" "$log" ||
            fail "the server did not stop cleanly on SIGTERM (exit $rc): $(tail -20 "$log")"
    fi
    runner="" server_pid=""
    "${bah[@]}" rm "$ctr" >/dev/null
    ctr=""
    echo "image-test: container $1 stopped cleanly on SIGTERM"
}

post() { # POST JSON, fail on a non-2xx answer
    curl -sS -f -H 'Content-Type: application/json' -d "$2" "$URL$1" || fail "POST $1 failed"
}
text() { python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"])'; }

sid="image-test-$$-$RANDOM"
start 1
stream=$(post /v1/completions '{"prompt": "Once upon a time", "max_tokens": 8, "stream": true}')
grep -q '"text"' <<<"$stream" && grep -q '^data: \[DONE\]' <<<"$stream" || fail "bad stream: $stream"
echo "image-test: streamed completion ok ($(grep -c '^data: {' <<<"$stream") chunks)"
post /v1/sessions "{\"session_id\": \"$sid\", \"prompt\": \"Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.\"}" >/dev/null
post "/v1/sessions/$sid/fork" "{\"session_id\": \"$sid-ref\"}" >/dev/null
gen='{"prompt": " And then", "max_tokens": 16, "temperature": 0}'
expected=$(post "/v1/sessions/$sid-ref/generate" "$gen" | text) # the uninterrupted run, in container 1
stop 1
start 2
got=$(post "/v1/sessions/$sid/generate" "$gen" | text)
[ "$got" = "$expected" ] || fail "the session continued differently after the restart: '$got' != '$expected'"
echo "image-test: session continued identically after the restart: '$got'"
curl -sf -X DELETE "$URL/v1/sessions/$sid" >/dev/null
curl -sf -X DELETE "$URL/v1/sessions/$sid-ref" >/dev/null
stop 2
echo "image-test: PASS: image $IMAGE, size $size, build ${build_s}s, whole test $(($(date +%s) - t0))s"
