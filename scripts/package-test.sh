#!/usr/bin/env bash
# Builds the four Debian packages (cargo-deb), checks their systemd units with systemd-analyze,
# installs the packages into a fresh container of the locally built Debian base image, and runs
# the stack there from the installed binaries and settings files: a file fetched through it
# must hash the same as the original. Then the same packages under systemd itself (a container
# whose first process is systemd): the four units, hardening and dynamic users as shipped, must
# carry the file too as dynamic users, serve metrics, reload, and leave a service with a
# configuration error failed rather than restart it. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null; then
    echo "package-test: installing cargo-deb from crates.io (about 2 minutes)"
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi

echo "== packages"
cargo build --release --bins --quiet
rm -rf target/debian
for p in relay agent frontend backend; do
    cargo deb -p "backhaul-$p" --no-build --quiet --output target/debian/
done
ls -l target/debian/

echo "== systemd units (systemd-analyze verify, and the exposure score)"
units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for p in relay agent frontend backend; do
    dpkg-deb --fsys-tarfile "target/debian/"backhaul-${p}_*.deb | tar -x -C "$units" ./usr/lib/systemd/system/backhaul-$p.service ./etc/backhaul/$p.toml
    # verify checks that ExecStart's program exists: point it at the one just built.
    sed "s|/usr/bin/|$PWD/target/release/|" "$units/usr/lib/systemd/system/backhaul-$p.service" > "$units/backhaul-$p.service"
done
systemd-analyze verify --man=no "$units"/backhaul-*.service
for p in relay agent frontend backend; do
    systemd-analyze security --offline=yes "$units/backhaul-$p.service" | tail -1
done

echo "== install into a fresh Debian container and run the stack from the packages"
bash docker/base-image.sh
ctx=$(mktemp -d)
trap 'rm -rf "$units" "$ctx"' EXIT
cp target/debian/*.deb "$ctx/"
image="backhaul-package-test:$$"
docker build -q -t "$image" -f - "$ctx" <<'EOF' >/dev/null
FROM backhaul/base:bookworm
COPY *.deb /tmp/debs/
RUN dpkg -i /tmp/debs/*.deb && rm -rf /tmp/debs
EOF
trap 'rm -rf "$units" "$ctx"; docker rmi -f "$image" >/dev/null 2>&1 || true' EXIT
# The stack both runs carry: a 3 MB file served on port 8000, and the few settings it needs,
# added to the installed settings files (which list every key commented out).
stack_setup() {
    cat <<'SH'
    mkdir -p /tmp/www && head -c 3000000 /dev/urandom > /tmp/www/blob
    busybox httpd -p 127.0.0.1:8000 -h /tmp/www
    printf "listen = \"127.0.0.1:8080\"\nadmin-loopback = true\n" >> /etc/backhaul/relay.toml
    printf "listen = \"127.0.0.1:9000\"\ntarget = \"127.0.0.1:8000\"\n" >> /etc/backhaul/backend.toml
    printf "relay = \"http://127.0.0.1:8080\"\nbackend-id = \"pkg\"\nbackend = \"ws://127.0.0.1:9000\"\n" >> /etc/backhaul/agent.toml
    printf "listen = \"127.0.0.1:7000\"\nrelay = \"http://127.0.0.1:8080\"\nbackend-id = \"pkg\"\n" >> /etc/backhaul/frontend.toml
SH
}
# Each container reads its script on stdin: quoted here-documents, so nothing in them is
# expanded or unquoted by this shell.
{ cat <<'SH'
    for p in relay agent frontend backend; do
        test -x /usr/bin/backhaul-$p && test -f /etc/backhaul/$p.toml && test -f /usr/lib/systemd/system/backhaul-$p.service
    done
SH
stack_setup
cat <<'SH'
    wait_for() { for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; cat "$1" "${1%.out}.err" >&2; exit 1; }
    for p in relay backend agent frontend; do
        backhaul-$p --config /etc/backhaul/$p.toml < /dev/null > /tmp/$p.out 2> /tmp/$p.err &
        case $p in agent) wait_for /tmp/agent.out "connected to relay" ;; *) wait_for /tmp/$p.out "listening on" ;; esac
    done
    busybox wget -q -O /tmp/got http://127.0.0.1:7000/blob
    want=$(sha256sum /tmp/www/blob | cut -d" " -f1)
    got=$(sha256sum /tmp/got | cut -d" " -f1)
    [ "$want" = "$got" ] || { echo "through the installed stack: sha256 $got, expected $want" >&2; exit 1; }
    echo "3 MB through the stack run from the packages: SHA-256 match"
    backhaul-agent --config /etc/backhaul/agent.toml --check
    backhaul-relay --version
SH
} | docker run --rm -i "$image" sh -eu
echo "== the installed units under systemd"
# systemd sets up each unit's sandbox (mount namespaces, seccomp filters), which needs
# CAP_SYS_ADMIN and no outer seccomp or AppArmor profile in the container; nothing else is
# granted.
sd_image="backhaul-package-systemd:$$"
docker build -q -t "$sd_image" - <<EOF >/dev/null
FROM $image
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null && rm -rf /var/lib/apt/lists/*
EOF
cid=$(docker run -d --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:ro "$sd_image" /lib/systemd/systemd)
trap 'rm -rf "$units" "$ctx"; docker rm -f "$cid" >/dev/null 2>&1 || true; docker rmi -f "$image" "$sd_image" >/dev/null 2>&1 || true' EXIT
{ cat <<'SH'
    booted=""
    for _ in $(seq 1 100); do
        case "$(systemctl is-system-running 2>/dev/null || true)" in running|degraded) booted=1; break ;; esac
        sleep 0.1
    done
    if [ -z "$booted" ]; then
        echo "systemd did not finish booting in the container within 10 s: $(systemctl is-system-running || true)" >&2
        systemctl --no-pager --failed >&2 || true
        exit 1
    fi
SH
stack_setup
cat <<'SH'
    # (LoadCredential= is not exercised: under this Docker engine systemd 252 leaves the
    # credential directory of every unit empty, even of a root unit without sandboxing.)
    systemctl daemon-reload
    systemctl start backhaul-relay backhaul-backend backhaul-agent backhaul-frontend
    # Until the agent has registered, the relay refuses the session and the fetch fails.
    ok=""
    for _ in $(seq 1 100); do
        if busybox wget -q -O /tmp/got http://127.0.0.1:7000/blob 2>/dev/null; then ok=1; break; fi
        sleep 0.1
    done
    if [ -z "$ok" ]; then
        systemctl --no-pager status "backhaul-*" >&2 || true
        journalctl --no-pager -u "backhaul-*" >&2
        echo "under systemd: nothing came through the stack within 10 s" >&2
        exit 1
    fi
    want=$(sha256sum /tmp/www/blob | cut -d" " -f1)
    got=$(sha256sum /tmp/got | cut -d" " -f1)
    [ "$want" = "$got" ] || { echo "under systemd: sha256 $got, expected $want" >&2; exit 1; }
    echo "3 MB through the four units under systemd: SHA-256 match"
    for p in relay agent frontend backend; do
        pid=$(systemctl show -p MainPID --value backhaul-$p)
        uid=$(awk "/^Uid:/ {print \$2}" /proc/$pid/status)
        [ "$uid" != 0 ] || { echo "backhaul-$p runs as root" >&2; exit 1; }
    done
    echo "every unit runs as a dynamic user, not root"
    busybox wget -q -O - http://127.0.0.1:8080/metrics \
        | grep -q "^backhaul_relay_sessions_opened_total{backend=\"pkg\"} [1-9]" \
        || { echo "the relay under systemd does not count the session in /metrics" >&2; exit 1; }
    echo "the relay under systemd counts the session in /metrics"
    # `systemctl reload` of backhaul-$1 must make it log $2 within 5 s and leave it running.
    reloads() {
        systemctl reload "backhaul-$1"
        for _ in $(seq 1 50); do
            journalctl --no-pager -u "backhaul-$1" | grep -q "$2" && break
            sleep 0.1
        done
        journalctl --no-pager -u "backhaul-$1" | grep -q "$2" \
            || { echo "systemctl reload did not reach the $1" >&2; exit 1; }
        systemctl is-active -q "backhaul-$1"
    }
    reloads relay "nothing to reload"
    reloads agent "reload done: serving pkg"
    echo "systemctl reload reaches the relay and the agent, which keep running"
    # A configuration error (exit 64) is not restarted over and over.
    echo "no-such-key = 1" >> /etc/backhaul/frontend.toml
    systemctl restart backhaul-frontend || true
    for _ in $(seq 1 50); do
        [ "$(systemctl show -p ActiveState --value backhaul-frontend)" = failed ] && break
        sleep 0.1
    done
    sleep 3   # RestartSec=2s: a restart, if one were coming, would show by now
    state=$(systemctl show -p ActiveState --value backhaul-frontend)
    status=$(systemctl show -p ExecMainStatus --value backhaul-frontend)
    restarts=$(systemctl show -p NRestarts --value backhaul-frontend)
    [ "$state" = failed ] && [ "$status" = 64 ] && [ "$restarts" = 0 ] \
        || { echo "frontend with a bad setting: $state, status $status, $restarts restarts" >&2; exit 1; }
    journalctl --no-pager -u backhaul-frontend | grep -q "no-such-key: no such setting" \
        || { echo "the journal does not say which setting is wrong" >&2; exit 1; }
    echo "a bad setting leaves the unit failed (exit 64, no restarts), its journal naming the key"
SH
} | docker exec -i "$cid" sh -eu
echo "package-test: all checks passed"
