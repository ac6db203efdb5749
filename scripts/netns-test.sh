#!/usr/bin/env bash
# Runs every test inside a fresh network namespace with only loopback up, so
# nothing a test does can reach another address. Needs root (or unshare -r).
set -euo pipefail
cd "$(dirname "$0")/.."
# Build outside the namespace (crates.io is reachable there), run inside.
cargo build --workspace --all-targets --locked
# The vendored, patched sctp-proto (vendor/sctp-proto/PATCHES.md) and its own tests.
vendored=(--manifest-path vendor/sctp-proto/Cargo.toml --target-dir target/vendor --locked)
cargo test "${vendored[@]}" --no-run
if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
exec "${ns[@]}" sh -c 'ip link set lo up && cargo nextest run --workspace --no-fail-fast --offline --locked "$@" && cargo test --doc --workspace --offline --locked && cargo test --manifest-path vendor/sctp-proto/Cargo.toml --target-dir target/vendor --locked --offline -q' sh "$@"
