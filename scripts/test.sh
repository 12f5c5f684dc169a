#!/usr/bin/env bash
# The whole test suite, tier by tier. A tier that runs zero tests fails.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

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

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

echo "== tier 2: privileged tests (root: real netlink, nftables and DNS in throwaway network namespaces; loop devices, ext4, tmpfs and binds in scratch directories; pulls from a real registry on loopback)"
# Built as the calling user, run as root.
bins=$(cargo test --locked -p berth-net -p berth-agent -p berth-storage -p berth-registry --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("wiring", "services", "pod_network", "storage", "registry"):
        print(m["executable"])')
: > "$log"
for bin in $bins; do
    sudo_if_needed "$bin" --ignored --test-threads=1 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
done
passed=$(count_passed "$log")
if [ "$passed" -eq 0 ]; then
    echo "tier 2 ran no tests: failing" >&2
    exit 1
fi
echo "tier 2: $passed privileged tests passed"

echo "== the examples validate"
cargo run --locked --quiet --bin berth -- validate manifests/ --images image/images.yaml

echo "== the benchmark script still runs (small corpus, debug build; figures are not checked)"
python3 scripts/bench_plan.py --pods 200 --runs 1 --berth target/debug/berth

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

