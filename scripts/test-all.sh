#!/usr/bin/env bash
# Runs every test: formatting and lints (rustfmt.toml, [workspace.lints] in Cargo.toml), host
# unit and integration tests, the SDK's tests, then the end-to-end suites, which build the test
# image and the UEFI disk image and boot them in QEMU. Prints the time of each phase.
set -euo pipefail
cd "$(dirname "$0")/.."

phase() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - start))s"
}

phase "formatting (cargo fmt --check)" cargo fmt --all --check
phase "lints (cargo clippy, warnings are errors)" cargo clippy --workspace --all-targets -- -D warnings
phase "host tests (cargo test --release --workspace)" cargo test --release --workspace
# The SDK's tests run against the real appliance server binary the host tests just built.
target_dir="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
phase "Python SDK tests (pytest, real appliance server)" \
  env OPENCOMPUTER_APPLIANCE_BIN="$target_dir/x86_64-unknown-linux-gnu/release/appliance" sdk/python/scripts/test.sh -q
phase "end-to-end in QEMU (qemu-test e2e)" cargo run --release -p qemu-test -- e2e
phase "the UEFI disk image on its own (qemu-test e2e-disk)" cargo run --release -p qemu-test -- e2e-disk
echo "=== all tests passed in ${SECONDS}s"
