#!/usr/bin/env bash
# Checks README's first command: runs scripts/demo.sh as a user would, fetches the sample page and
# the 50 MB file through the stack it starts (compared by SHA-256), checks that a frontend without
# the demo's client token is refused, then stops the demo and checks nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

out="$(mktemp -t backhaul-demo-test.XXXXXX)"
fail() {
    echo "demo-test: $*" >&2
    echo "--- demo output:" >&2
    cat "$out" >&2
    exit 1
}
# Its own session, so that stopping it reaches every program it started.
BACKHAUL_DEMO_LISTEN=127.0.0.1:0 setsid bash scripts/demo.sh > "$out" 2>&1 &
demo=$!
trap 'kill -TERM -- "-$demo" 2>/dev/null || true; rm -f "$out"' EXIT

for _ in $(seq 1 1200); do
    grep -q "Press Ctrl-C" "$out" && break
    kill -0 "$demo" 2>/dev/null || fail "the demo exited before it was ready"
    sleep 0.5
done
grep -q "Press Ctrl-C" "$out" || fail "the demo was not ready within 10 minutes"

front=$(sed -n 's/^  curl http:\/\/\([0-9.:]*\)\/$/\1/p' "$out")
relay=$(sed -n 's/^  relay *http:\/\/\([0-9.:]*\).*/\1/p' "$out")
site=$(sed -n 's/.*sha256sum \(.*\)\/50MB.bin$/\1/p' "$out")
[ -n "$front" ] && [ -n "$relay" ] && [ -n "$site" ] || fail "could not read the addresses the demo printed"

curl -sf --max-time 30 "http://$front/" | grep -q "Hello through backhaul" \
    || fail "the sample page did not come through the frontend at $front"
want=$(sha256sum "$site/50MB.bin" | cut -d' ' -f1)
got=$(curl -sf --max-time 120 "http://$front/50MB.bin" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "50 MB through the stack: sha256 $got, expected $want"
echo "demo: sample page and 50 MB through the stack, SHA-256 match"

refused=$(printf 'GET / HTTP/1.0\r\n\r\n' \
    | env -u BACKHAUL_CLIENT_TOKEN timeout 20 target/release/backhaul-frontend --stdio --relay "http://$relay" --backend-id demo 2>&1 || true)
echo "$refused" | grep -q "401" || fail "a frontend without the client token was not refused: $refused"
echo "demo: a frontend without the client token is refused (401)"

busy=$(BACKHAUL_DEMO_LISTEN="$front" timeout 20 bash scripts/demo.sh 2>&1 || true)
echo "$busy" | grep -q "BACKHAUL_DEMO_LISTEN=" || fail "a second demo on the busy $front did not say how to pick another address: $busy"
echo "demo: a busy address fails at once and names BACKHAUL_DEMO_LISTEN"
[ -s target/demo/relay.err ] || fail "the demo's logs are not in target/demo/"

kill -TERM "$demo"
for _ in $(seq 1 100); do
    kill -0 "$demo" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$demo" 2>/dev/null && fail "the demo did not stop on SIGTERM within 10 s"
if pgrep -s "$demo" > /dev/null; then
    fail "programs of the demo outlived it: $(pgrep -a -s "$demo")"
fi
echo "demo-test: all checks passed"
