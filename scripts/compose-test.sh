#!/usr/bin/env bash
# End-to-end test of docker-compose.yml: builds the images, brings the stack up under a unique
# project name with the frontend on an ephemeral host port, sends data both ways and checks it by
# SHA-256, proves the agent has no way to the relay except the egress proxy, restarts the agent
# and checks new connections work again. Tears everything down, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    echo "compose-test: neither 'docker compose' nor 'docker-compose' is available" >&2
    exit 1
fi
project="backhaul-test-$$"
compose() { "${compose_cmd[@]}" -p "$project" "$@"; }
work="$(mktemp -d -t backhaul-compose.XXXXXX)"
ok=0
cleanup() {
    if [ "$ok" != 1 ]; then
        echo "compose-test: FAILED; container logs follow" >&2
        compose logs --no-color --tail=80 >&2 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "compose-test: $*" >&2; exit 1; }

# Polls a condition (a shell command) once a second for up to $1 seconds.
wait_until() {
    local limit=$1; shift
    for _ in $(seq 1 "$limit"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    return 1
}
no_agents() {
    compose exec -T relay busybox wget -q -O- http://127.0.0.1:8080/healthz | grep -q '(0 agent links)'
}
agents_registered() {
    compose exec -T relay busybox wget -q -O- http://127.0.0.1:8080/healthz | grep -qv '(0 agent links)'
}

echo "== base image and binaries"
bash docker/base-image.sh
cargo build --release --bins --quiet

echo "== build images and start the stack ($project)"
export BACKHAUL_PUBLISH=127.0.0.1:0
compose build -q
compose up -d
wait_until 120 agents_registered || fail "the agent never registered with the relay"
front=$(compose port frontend 7000)
[ -n "$front" ] || fail "frontend port is not published"
echo "frontend published at $front"

check_transfer() {
    local want got
    # The hash docs/compose.md tells users to compare against, served through the stack.
    want=$(curl -sf --max-time 60 "http://$front/blob.sha256" | cut -d' ' -f1)
    [ "$want" = "$(compose exec -T sample sha256sum /tmp/www/blob.bin | cut -d' ' -f1)" ] \
        || fail "blob.sha256 does not match blob.bin"
    got=$(curl -sf --max-time 60 "http://$front/blob.bin" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "download through the stack: sha256 $got, expected $want"
    head -c 6291456 /dev/urandom > "$work/up.bin"
    want=$(sha256sum "$work/up.bin" | cut -d' ' -f1)
    got=$(curl -sf --max-time 60 --data-binary @"$work/up.bin" "http://$front/cgi-bin/sha256" | tr -d '\r\n')
    [ "$got" = "$want" ] || fail "upload through the stack: service saw sha256 $got, expected $want"
    echo "8 MiB down and 6 MiB up through the stack: SHA-256 match"
}

echo "== data through the stack"
check_transfer

echo "== the agent's healthcheck"
out=$(compose exec -T agent backhaul-agent --check) || fail "backhaul-agent --check failed in the agent's container: $out"
echo "$out"

echo "== the relay refuses sessions without the client token"
refusal=$(compose exec -T frontend busybox wget -q -O /dev/null http://relay:8080/b/sample 2>&1 || true)
echo "$refusal" | grep -q '401' || fail "a session request without the client token was not refused with 401: $refusal"
echo "without the token: $refusal"

echo "== the agent's only way out is the egress proxy"
# (Debian's busybox 1.35 wget crashes when given -T, so coreutils' timeout bounds it instead.)
ip_of() {
    docker inspect -f "{{range \$k, \$v := .NetworkSettings.Networks}}{{if eq \$k \"${project}_$2\"}}{{\$v.IPAddress}}{{end}}{{end}}" "$(compose ps -q "$1")"
}
relay_ip=$(ip_of relay public)
egress_ip=$(ip_of egress private)
[ -n "$relay_ip" ] && [ -n "$egress_ip" ] || fail "could not find the relay's or the egress proxy's address"
if compose exec -T agent sh -c "printf 'GET /healthz HTTP/1.0\r\n\r\n' | busybox nc -w 5 relay 8080" 2>/dev/null | grep -q '200 OK'; then
    fail "the agent's container reached the relay directly by name"
fi
if compose exec -T agent timeout 5 busybox wget -q -O - "http://$relay_ip:8080/healthz" 2>/dev/null | grep -q '^ok'; then
    fail "the agent's container reached the relay directly at $relay_ip; the private network is not isolated"
fi
compose exec -T agent sh -c "http_proxy=http://egress:8888 timeout 10 busybox wget -q -O - http://relay:8080/healthz" | grep -q '^ok' \
    || fail "the agent's container cannot reach the relay even through the egress proxy"
# Keep nc's input open briefly so it reads the proxy's answer before it hangs up.
status=$(compose exec -T agent sh -c "(printf 'CONNECT relay:8080 HTTP/1.1\r\nHost: relay:8080\r\n\r\n'; sleep 3) | busybox nc -w 5 $egress_ip 8888" | sed -n 1p | tr -d '\r' || true)
case "$status" in
    "HTTP/1."?" 4"*) ;;
    *) fail "the egress proxy should refuse CONNECT with a 4xx status; it answered: '$status'" ;;
esac
echo "direct to relay (relay, $relay_ip): no route; through the egress proxy ($egress_ip): reachable; CONNECT: $status"

echo "== restart the agent"
compose stop agent
wait_until 30 no_agents || fail "the relay did not notice the stopped agent"
compose start agent
wait_until 60 agents_registered || fail "the restarted agent never registered"
check_transfer

ok=1
echo "compose-test: all checks passed"
