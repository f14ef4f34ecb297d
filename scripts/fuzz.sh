#!/usr/bin/env bash
# Runs every cargo-fuzz target of the repository for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS]        # default 60 s per target
#
# Fuzz crates are discovered, not listed: every */fuzz or */*/fuzz directory whose Cargo.toml
# has `cargo-fuzz = true` (proxy/fuzz, init/fuzz, ...). Each target runs with
# `cargo fuzz run <target> -- -max_total_time=SECONDS` (one input running over 30 s counts as a
# hang, which is a failure like a crash), seeded from the crate's seeds/<target>/
# and corpus/<target>/ when present; new corpus entries, crash artifacts and the build go to a
# directory outside the tree ($FUZZ_WORK, default /work/targets/fuzz, or
# ${TMPDIR:-/tmp}/opencomputer-fuzz if /work/targets does not exist); in the tree, cargo-fuzz
# only creates each crate's (git-ignored) artifacts/ folder.
#
# FUZZ_CRATES restricts the run to some crates, by path relative to the repository
# (e.g. FUZZ_CRATES="init/fuzz"); FUZZ_TARGETS to some targets by name (e.g. "gpt fat").
#
# Only stable Rust is needed: the sanitizer flags cargo-fuzz passes require RUSTC_BOOTSTRAP=1,
# which this script sets. cargo-fuzz is installed with `cargo install cargo-fuzz --locked` if
# missing. The exit status is non-zero if any target crashed (or failed to build); the failing
# targets are named at the end, each with the artifact to replay it:
#
#   cd <crate>/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: $0 [SECONDS]   (seconds per target, default 60)" >&2
  exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${FUZZ_WORK:-}" ]; then
  work="$FUZZ_WORK"
elif [ -d /work/targets ]; then
  work=/work/targets/fuzz
else
  work="${TMPDIR:-/tmp}/opencomputer-fuzz"
fi
mkdir -p "$work"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1

crates=()
for manifest in "$repo"/*/fuzz/Cargo.toml "$repo"/*/*/fuzz/Cargo.toml; do
  [ -f "$manifest" ] || continue
  grep -Eq '^[[:space:]]*cargo-fuzz[[:space:]]*=[[:space:]]*true' "$manifest" || continue
  crate="$(dirname "$manifest")"
  if [ -n "${FUZZ_CRATES:-}" ] && ! [[ " $FUZZ_CRATES " == *" ${crate#"$repo"/} "* ]]; then
    continue
  fi
  crates+=("$crate")
done
if [ "${#crates[@]}" -eq 0 ]; then
  echo "no cargo-fuzz crates found under $repo${FUZZ_CRATES:+ matching FUZZ_CRATES=$FUZZ_CRATES}" >&2
  exit 1
fi

failed=()
total=0
for crate in "${crates[@]}"; do
  rel="${crate#"$repo"/}"
  name="${rel//\//-}"
  export CARGO_TARGET_DIR="$work/$name/target"
  cd "$crate"
  echo "== $rel: building"
  if ! nice -n 5 cargo fuzz build; then
    failed+=("$rel (build)")
    continue
  fi
  mapfile -t targets < <(cargo fuzz list)
  for target in "${targets[@]}"; do
    if [ -n "${FUZZ_TARGETS:-}" ] && ! [[ " $FUZZ_TARGETS " == *" $target "* ]]; then
      continue
    fi
    total=$((total + 1))
    corpus="$work/$name/corpus/$target"
    artifacts="$work/$name/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    for dir in "seeds/$target" "corpus/$target"; do
      [ -d "$dir" ] && seeds+=("$dir")
    done
    log="$work/$name/$target.log"
    echo "== $rel: $target for ${seconds}s (log: $log)"
    if nice -n 5 cargo fuzz run "$target" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=30 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
      grep -E '^Done [0-9]+ runs' "$log" | tail -n 1 || true
    else
      artifact="$(grep -Eo 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/^Test unit written to //' || true)"
      echo "!! $rel: $target FAILED${artifact:+ (artifact: $artifact)}; see $log"
      tail -n 30 "$log" | sed 's/^/   /'
      failed+=("$rel: $target${artifact:+ ($artifact)}")
    fi
  done
done

echo
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzzing failed ($total targets run):"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "all $total fuzz targets ran ${seconds}s each without a crash"
