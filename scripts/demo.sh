#!/usr/bin/env bash
# Starts the whole backhaul stack on this machine with a sample web service behind it:
#
#   curl -> frontend (127.0.0.1:7000) -> relay -> agent -> backend -> sample HTTP service
#
# The agent reaches the relay only with outbound HTTP requests, as it would from inside a
# private network. Ctrl-C stops everything. Set BACKHAUL_DEMO_LISTEN to use another address.
set -euo pipefail
cd "$(dirname "$0")/.."

listen="${BACKHAUL_DEMO_LISTEN:-127.0.0.1:7000}"
work="$(mktemp -d -t backhaul-demo.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building backhaul (release)..."
cargo build --release --bins --quiet
bin="$PWD/target/release"

# Waits for a line matching $2 in file $1 and prints the address after "listening on ".
wait_for() {
    local file=$1 pattern=$2
    for _ in $(seq 1 300); do
        if grep -q "$pattern" "$file" 2>/dev/null; then
            grep -m1 "$pattern" "$file"
            return 0
        fi
        sleep 0.1
    done
    echo "demo: timed out waiting for '$pattern' in $file:" >&2
    cat "$file" "${file%.out}.err" >&2 2>/dev/null || true
    exit 1
}
addr_of() { wait_for "$1" "listening on" | sed 's/.*listening on //'; }

# The sample service: a small web site on an ephemeral port.
mkdir -p "$work/site"
cat > "$work/site/index.html" <<HTML
<!doctype html><title>backhaul demo</title>
<h1>Hello through backhaul</h1>
<p>This page is served from inside the "private network" of the demo, carried
client &rarr; frontend &rarr; relay &lArr; agent &rarr; backend &rarr; this server.</p>
HTML
head -c 50000000 /dev/urandom > "$work/site/50MB.bin"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$work/site" > "$work/web.out" 2> "$work/web.err" &
pids+=($!)
web_port=$(wait_for "$work/web.out" "Serving HTTP" | sed -E 's/.* port ([0-9]+).*/\1/')

"$bin/backhaul-backend" --listen 127.0.0.1:0 --target "127.0.0.1:$web_port" > "$work/backend.out" 2> "$work/backend.err" &
pids+=($!)
backend=$(addr_of "$work/backend.out")

# Fresh tokens: the relay admits only this demo's agent and frontends. (In the environment, not
# on command lines, where other users could read them in the process list.)
export BACKHAUL_AGENT_TOKEN BACKHAUL_CLIENT_TOKEN
BACKHAUL_AGENT_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
BACKHAUL_CLIENT_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')

"$bin/backhaul-relay" --listen 127.0.0.1:0 > "$work/relay.out" 2> "$work/relay.err" &
pids+=($!)
relay=$(addr_of "$work/relay.out")

"$bin/backhaul-agent" --relay "http://$relay" --backend-id demo --backend "ws://$backend" > "$work/agent.out" 2> "$work/agent.err" &
pids+=($!)
wait_for "$work/agent.out" "connected to relay" > /dev/null
transport=$(wait_for "$work/agent.out" "carried over" | sed 's/.*carried over //')

"$bin/backhaul-frontend" --listen "$listen" --relay "http://$relay" --backend-id demo > "$work/frontend.out" 2> "$work/frontend.err" &
pids+=($!)
front=$(addr_of "$work/frontend.out")

cat <<INFO

backhaul is running:
  sample web service   127.0.0.1:$web_port   (the "private" service)
  backend              $backend
  relay                http://$relay   (client token $BACKHAUL_CLIENT_TOKEN)
  agent                serving backend id "demo", linked to the relay over $transport
                       (--transport longpoll|http2 to try the others)
  frontend             $front                (clients connect here)

Try it:
  curl http://$front/
  curl -s http://$front/50MB.bin | sha256sum; sha256sum $work/site/50MB.bin
  # stdin/stdout mode (as an ssh ProxyCommand):
  BACKHAUL_CLIENT_TOKEN=$BACKHAUL_CLIENT_TOKEN $bin/backhaul-frontend --stdio --relay http://$relay --backend-id demo

Logs are in $work/*.err. Press Ctrl-C to stop.
INFO
wait -n "${pids[@]}" || true
echo "demo: a component exited; stopping (logs were in $work)" >&2
