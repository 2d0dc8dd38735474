#!/usr/bin/env bash
# Runs every test of backhaul: unit tests and the end-to-end tests that start the four real
# programs. Installs what the tests need (tinyproxy, openssl, OpenSSH, Chromium, websocat) when it is missing. Extra
# arguments go to `cargo test` (e.g. a test name filter). Ends with a line
# "tests: N passed, N failed", also saved in target/test-summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# tinyproxy: the forward proxy the agent must go through; openssl: test certificates.
missing=()
[ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ] || missing+=(tinyproxy)
command -v openssl >/dev/null || missing+=(openssl)
# OpenSSH: the stdio tests run their own sshd behind the stack (never the system's) and reach it
# with ssh and scp through `backhaul-frontend --stdio`.
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
for c in ssh scp ssh-keygen; do
    command -v "$c" >/dev/null || { missing+=(openssh-client); break; }
done
# Chromium: the status page test renders the relay's /status as a browser does.
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]} (the end-to-end tests need them)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# websocat (crates.io): the WebSocket client of the HTTP bridge's tests, as its users have it.
if ! command -v websocat >/dev/null && [ ! -x "$HOME/.cargo/bin/websocat" ]; then
    echo "test.sh: installing websocat from crates.io (the HTTP bridge tests use it; about 4 minutes)"
    cargo install websocat --locked --no-default-features --quiet
fi

# The end-to-end tests run the binaries from target/, so build them first.
cargo build --workspace --bins
# The tests' scratch directories (logs, configurations, keys) live in target/e2e-scratch/:
# the last run's stay for looking into failures, older ones go.
rm -rf target/e2e-scratch
mkdir -p target
log=target/test-output.txt
status=0
# A hung test must fail the run, not stall CI: the whole run gets at most 40 minutes.
timeout --kill-after=30 2400 cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log" \
    | tee target/test-summary.txt
exit "$status"
