#!/usr/bin/env bash
# Starts the whole backhaul stack on this machine with a sample web service behind it:
#
#   curl -> frontend (127.0.0.1:7000) -> relay -> agent -> backend -> sample HTTP service
#
# The agent reaches the relay only with outbound HTTP requests, as it would from inside a
# private network. Ctrl-C stops everything.
#
# BACKHAUL_DEMO_LISTEN     the frontend's address (default 127.0.0.1:7000)
# BACKHAUL_DEMO_TRANSPORT  the agent's transport: auto (default), websocket, http2 or longpoll
#
# The programs' logs go to target/demo/ and stay there after the demo stops.
set -euo pipefail
cd "$(dirname "$0")/.."

listen="${BACKHAUL_DEMO_LISTEN:-127.0.0.1:7000}"
transport_choice="${BACKHAUL_DEMO_TRANSPORT:-auto}"
# A taken port fails now, not after the build.
host="${listen%:*}" port="${listen##*:}"
if [ "$port" != 0 ] && (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "demo: $listen is already in use; run with another address, e.g. BACKHAUL_DEMO_LISTEN=127.0.0.1:7001 bash scripts/demo.sh" >&2
    exit 1
fi
work="$(mktemp -d -t backhaul-demo.XXXXXX)"
logs="$PWD/target/demo"
rm -rf "$logs" && mkdir -p "$logs"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building backhaul (release; the first build compiles every dependency, about 5 minutes on two cores)..."
cargo build --release --bins
bin="$PWD/target/release"

# Waits for a line matching $2 in file $1 (written by process $3) and prints it; fails at once
# with the program's log if the process exits first.
wait_for() {
    local file=$1 pattern=$2 pid=$3
    for _ in $(seq 1 300); do
        if grep -q "$pattern" "$file" 2>/dev/null; then
            grep -m1 "$pattern" "$file"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "demo: $(basename "${file%.out}") exited before it was ready; its log (${file%.out}.err):" >&2
            cat "${file%.out}.err" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.1
    done
    echo "demo: timed out waiting for '$pattern' in $file:" >&2
    cat "$file" "${file%.out}.err" >&2 2>/dev/null || true
    exit 1
}
addr_of() { wait_for "$1" "listening on" "$2" | sed 's/.*listening on //'; }

# The sample service: a small web site on an ephemeral port.
mkdir -p "$work/site"
cat > "$work/site/index.html" <<HTML
<!doctype html><title>backhaul demo</title>
<h1>Hello through backhaul</h1>
<p>This page is served from inside the "private network" of the demo, carried
client &rarr; frontend &rarr; relay &lArr; agent &rarr; backend &rarr; this server.</p>
HTML
head -c 50000000 /dev/urandom > "$work/site/50MB.bin"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$work/site" > "$logs/web.out" 2> "$logs/web.err" &
pids+=($!)
web_port=$(wait_for "$logs/web.out" "Serving HTTP" $! | sed -E 's/.* port ([0-9]+).*/\1/')

"$bin/backhaul-backend" --listen 127.0.0.1:0 --target "127.0.0.1:$web_port" > "$logs/backend.out" 2> "$logs/backend.err" &
pids+=($!)
backend=$(addr_of "$logs/backend.out" $!)

# Fresh tokens: the relay admits only this demo's agent and frontends. (In the environment, not
# on command lines, where other users could read them in the process list.)
export BACKHAUL_AGENT_TOKEN BACKHAUL_CLIENT_TOKEN
BACKHAUL_AGENT_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
BACKHAUL_CLIENT_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')

"$bin/backhaul-relay" --listen 127.0.0.1:0 --admin-loopback > "$logs/relay.out" 2> "$logs/relay.err" &
pids+=($!)
relay=$(addr_of "$logs/relay.out" $!)

"$bin/backhaul-agent" --relay "http://$relay" --backend-id demo --backend "ws://$backend" \
    --transport "$transport_choice" > "$logs/agent.out" 2> "$logs/agent.err" &
agent=$!
pids+=($agent)
wait_for "$logs/agent.out" "connected to relay" $agent > /dev/null
transport=$(wait_for "$logs/agent.out" "carried over" $agent | sed 's/.*carried over //')

"$bin/backhaul-frontend" --listen "$listen" --relay "http://$relay" --backend-id demo > "$logs/frontend.out" 2> "$logs/frontend.err" &
pids+=($!)
front=$(addr_of "$logs/frontend.out" $!)

cat <<INFO

backhaul is running:
  sample web service   127.0.0.1:$web_port   (the "private" service)
  backend              $backend
  relay                http://$relay   (client token $BACKHAUL_CLIENT_TOKEN)
  agent                serving backend id "demo", linked to the relay over $transport
                       (BACKHAUL_DEMO_TRANSPORT=longpoll or http2 bash scripts/demo.sh
                        to try the others)
  frontend             $front                (clients connect here)

Try it:
  curl http://$front/
  curl -s http://$front/50MB.bin | sha256sum; sha256sum $work/site/50MB.bin
  # stdin/stdout mode (as an ssh ProxyCommand):
  BACKHAUL_CLIENT_TOKEN=$BACKHAUL_CLIENT_TOKEN $bin/backhaul-frontend --stdio --relay http://$relay --backend-id demo

The relay's status page: http://$relay/status (metrics: http://$relay/metrics)
Logs are in $logs/*.err (kept after the demo stops). Press Ctrl-C to stop.
INFO
wait -n "${pids[@]}" || true
echo "demo: a component exited; stopping (logs are in $logs)" >&2
