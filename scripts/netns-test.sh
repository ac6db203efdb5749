#!/usr/bin/env bash
# Runs every test: installs what they need when it is missing (Debian
# packages for the NAT lab and the browser tests, npm packages from the
# lockfile), builds, then runs everything inside a fresh network namespace
# with only loopback up, so nothing a test does can reach another address.
# Needs root (or unshare -r; package installs need root).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests use from the system: the NAT lab (crates/cli/tests/natlab.rs)
# needs NATs, conntrack and coturn; the Redis backplane tests
# (crates/signal/tests/server.rs, crates/cli/tests/cluster.rs) run Debian's
# redis-server; the browser tests (web/test/e2e) need Debian's Chromium and
# Node; the vendored dimpl's own tests talk to the system's OpenSSL.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v ping >/dev/null || need+=(iputils-ping)
command -v turnserver >/dev/null || need+=(coturn)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v python3 >/dev/null || need+=(python3)
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "the tests need these packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# The browser side: dependencies from the lockfile, types, unit tests, and
# the committed copy of the vendored modules must be what vendor.mjs makes.
(
  cd web
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
  echo "== web: tsc"
  npx --no-install tsc -p jsconfig.json
  echo "== web: vendored modules are fresh"
  node scripts/vendor.mjs >/dev/null
  git diff --exit-code --stat -- vendor
  test -z "$(git status --porcelain -- vendor)" || { git status --porcelain -- vendor; echo "web/vendor is stale: run npm run vendor" >&2; exit 1; }
  echo "== web: unit tests"
  node --test test/unit/
)

# Build outside the namespace (crates.io is reachable there), run inside.
cargo build --workspace --all-targets --locked
# The vendored, patched sctp-proto and dimpl (vendor/*/PATCHES.md) and their
# own tests.
for crate in sctp-proto dimpl; do
  cargo test --manifest-path "vendor/$crate/Cargo.toml" --target-dir target/vendor --locked --no-run
done
if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
exec "${ns[@]}" sh -c '
  set -e
  ip link set lo up
  cargo nextest run --workspace --no-fail-fast --offline --locked "$@"
  cargo test --doc --workspace --offline --locked
  cargo test --manifest-path vendor/sctp-proto/Cargo.toml --target-dir target/vendor --locked --offline -q
  cargo test --manifest-path vendor/dimpl/Cargo.toml --target-dir target/vendor --locked --offline -q
  echo "== web: browser tests (Chromium, in this namespace)"
  cd web && node --test --test-concurrency=1 test/e2e/
' sh "$@"
