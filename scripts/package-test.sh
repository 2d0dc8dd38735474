#!/usr/bin/env bash
# Builds the four Debian packages (cargo-deb), checks their systemd units with systemd-analyze,
# installs the packages into a fresh container of the locally built Debian base image, and runs
# the stack there from the installed binaries and settings files: a file fetched through it
# must hash the same as the original. Run by .ci/run.
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
docker run --rm "$image" sh -euc '
    for p in relay agent frontend backend; do
        test -x /usr/bin/backhaul-$p && test -f /etc/backhaul/$p.toml && test -f /usr/lib/systemd/system/backhaul-$p.service
    done
    mkdir -p /tmp/www && head -c 3000000 /dev/urandom > /tmp/www/blob
    busybox httpd -p 127.0.0.1:8000 -h /tmp/www
    # The installed settings files list every key commented out: add the few this stack needs.
    printf "listen = \"127.0.0.1:8080\"\n" >> /etc/backhaul/relay.toml
    printf "listen = \"127.0.0.1:9000\"\ntarget = \"127.0.0.1:8000\"\n" >> /etc/backhaul/backend.toml
    printf "relay = \"http://127.0.0.1:8080\"\nbackend-id = \"pkg\"\nbackend = \"ws://127.0.0.1:9000\"\n" >> /etc/backhaul/agent.toml
    printf "listen = \"127.0.0.1:7000\"\nrelay = \"http://127.0.0.1:8080\"\nbackend-id = \"pkg\"\n" >> /etc/backhaul/frontend.toml
    wait_for() { for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; cat "$1" "${1%.out}.err" >&2; exit 1; }
    for p in relay backend agent frontend; do
        backhaul-$p --config /etc/backhaul/$p.toml > /tmp/$p.out 2> /tmp/$p.err &
        case $p in agent) wait_for /tmp/agent.out "connected to relay" ;; *) wait_for /tmp/$p.out "listening on" ;; esac
    done
    busybox wget -q -O /tmp/got http://127.0.0.1:7000/blob
    want=$(sha256sum /tmp/www/blob | cut -d" " -f1)
    got=$(sha256sum /tmp/got | cut -d" " -f1)
    [ "$want" = "$got" ] || { echo "through the installed stack: sha256 $got, expected $want" >&2; exit 1; }
    echo "3 MB through the stack run from the packages: SHA-256 match"
    backhaul-agent --config /etc/backhaul/agent.toml --check
    backhaul-relay --version
'
echo "package-test: all checks passed"
