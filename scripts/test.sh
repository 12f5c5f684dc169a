#!/usr/bin/env bash
# The whole test suite, tier by tier. A tier that runs zero tests fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Each tier's wall time, printed at the end (CI has a budget).
durations=()
started=$SECONDS
tier_done() {
    durations+=("$1: $((SECONDS - started)) s")
    started=$SECONDS
}

count_passed() {
    grep -Eo 'test result: ok\. [0-9]+ passed' "$1" | awk '{s += $4} END {print s + 0}'
}

echo "== tier 1: cargo test (pure stages, the berth binary on real files and Git repositories; no root)"
cargo test --locked --workspace 2>&1 | tee "$log"
passed=$(count_passed "$log")
if [ "$passed" -eq 0 ]; then
    echo "tier 1 ran no tests: failing" >&2
    exit 1
fi
echo "tier 1: $passed tests passed"
tier_done "tier 1 (cargo test)"

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

echo "== tier 2: privileged tests (root: real netlink, nftables and DNS in throwaway network namespaces; loop devices, ext4, tmpfs and binds in scratch directories; pulls from a real registry on loopback)"
# Built as the calling user, run as root. Every test binary of the
# workspace (the QEMU harness aside) whose ignored tests are not benchmarks
# is a privileged one: a new privileged test file runs without being listed.
bins=$(cargo test --locked --workspace --exclude berth-qemu-tests --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
: > "$log"
ran_bins=0
for bin in $bins; do
    listed=$("$bin" --list --ignored --skip bench_ 2>/dev/null | grep -c ': test$' || true)
    [ "$listed" -gt 0 ] || continue
    ran_bins=$((ran_bins + 1))
    echo "-- $(basename "$bin"): $listed privileged tests"
    sudo_if_needed "$bin" --ignored --skip bench_ --test-threads=1 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
done
passed=$(count_passed "$log")
if [ "$passed" -eq 0 ]; then
    echo "tier 2 ran no tests: failing" >&2
    exit 1
fi
echo "tier 2: $passed privileged tests passed in $ran_bins test binaries"
tier_done "tier 2 (privileged)"

echo "== the examples validate"
cargo run --locked --quiet --bin berth -- validate manifests/ --images image/images.yaml

echo "== the benchmark script still runs (small corpus, debug build; figures are not checked)"
python3 scripts/bench_plan.py --pods 200 --runs 1 --berth target/debug/berth

tier_done "examples and benchmark smoke run"

echo "== tier 3: the appliance image in QEMU (UEFI, TCG)"
cargo build --locked --release --bin berth
sudo_if_needed image/build.sh --test --berth target/release/berth
cargo test --locked -p berth-qemu-tests -- --ignored --skip bench_ --test-threads=1 --nocapture 2>&1 | tee "$log"
passed=$(count_passed "$log")
if [ "$passed" -eq 0 ]; then
    echo "the QEMU tier ran no tests: failing (console logs are under target/qemu-tests/)" >&2
    exit 1
fi
echo "tier 3: $passed QEMU tests passed"
tier_done "tier 3 (QEMU, image build included)"

echo "== durations"
printf '  %s\n' "${durations[@]}"
