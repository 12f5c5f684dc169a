# The two commands the README promises, and a few helpers.
.PHONY: demo plan-demo image test-image bench-image test deps build release bench bench-pods bench-probes bench-rollout bench-probes-host bench-net bench-storage bench-images bench-mirror bench-boot bench-anchors bench-sandbox bless

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

deps:
	scripts/deps.sh

build: deps
	cargo build --locked

release: deps
	cargo build --locked --release

# The test image (the appliance with its test command channel), the agent
# built for release: what the demo and the QEMU benchmarks boot.
test-image: deps
	cargo build --locked --release --bin berth
	$(SUDO) image/build.sh --test --berth target/release/berth

# The test image plus Debian's podman, for bench-anchors.
bench-image: deps
	cargo build --locked --release --bin berth
	$(SUDO) image/build.sh --bench --berth target/release/berth

# Builds the appliance image, seeds a local Git repository with manifests/,
# boots the node in QEMU (UEFI, TCG) and shows it fetching and planning them.
demo: test-image
	cargo run --locked --release -p berth-qemu-tests --bin berth-demo -- $(ARGS)

# Only the plan, without an image or a VM.
plan-demo: build
	target/debug/berth validate manifests/ --images image/images.yaml
	target/debug/berth plan manifests/ --images image/images.yaml --node demo-node

# A release image (no test channel): build/berth-<version>-amd64.img and .img.zst
image: deps
	cargo build --locked --release --bin berth
	$(SUDO) image/build.sh --berth target/release/berth

test: deps
	scripts/test.sh

bench: release
	python3 scripts/bench_plan.py

# Pods on the appliance in QEMU: time to 1 and 50 pods, agent memory and CPU.
bench-pods: test-image
	cargo test --locked -p berth-qemu-tests --test bench_pods -- --ignored --nocapture

# What probes cost the agent (50 pods, three probes each at 1 s) and how
# fast a readiness change leaves the Service.
bench-probes: test-image
	cargo test --locked -p berth-qemu-tests --test bench_probes -- --ignored --nocapture

# Rollouts under load: requests failed while an image and an env var
# change, and rollout time against replicas × start-to-ready.
bench-rollout: test-image
	cargo test --locked -p berth-qemu-tests --test bench_rollout -- --ignored --nocapture

bench-probes-host: deps
	$(SUDO) scripts/bench_probe_host.sh

# Berth against Podman's `kube play`, the same YAML in the same guest and
# boot (a bench image: the test image with Debian's podman): start time,
# processes and memory added per container, idle supervisor CPU and removal
# time for 1, 10 and 50 pods. Prints the table and writes it into
# docs/benchmarks.md.
bench-anchors: bench-image
	cargo test --locked -p berth-qemu-tests --test bench_anchors -- --ignored --nocapture

# What each sandbox setting of a container costs systemd's start of it.
bench-sandbox: test-image
	cargo test --locked -p berth-qemu-tests --test bench_sandbox -- --ignored --nocapture

# Where the boot time goes: QEMU start to the agent ready, by phase, over
# several boots (BERTH_BENCH_BOOTS, 3 by default).
bench-boot: test-image
	cargo test --locked -p berth-qemu-tests --test bench_boot -- --ignored --nocapture

# Pod networking (root): TCP over veth/bridge/Service, the Services table at
# 1,000 Services, DNS queries per second.
bench-net: deps
	cargo build --locked --release -p berth-net --example netbench
	$(SUDO) target/release/examples/netbench

bench-storage: deps
	cargo build --locked --release -p berth-storage --example storagebench
	$(SUDO) target/release/examples/storagebench

# Pulls of a 50 MB and a 500 MB image from a registry on loopback, against
# skopeo copy + umoci unpack in the same run; then on the appliance (QEMU):
# commit to a pod running on each, and the disk of 10 pods of one image.
bench-images: deps
	@command -v skopeo >/dev/null && command -v umoci >/dev/null || $(SUDO) apt-get install -y -qq skopeo umoci
	cargo build --locked --release -p berth-registry --features fixtures --example bench_pull
	target/release/examples/bench_pull
	$(MAKE) test-image
	cargo test --locked --release -p berth-qemu-tests --test bench_images -- --ignored --nocapture

# The agent's memory and disk with a long-lived mirror: 500 desired commits
# fetched and applied, 500 status commits pushed (in-memory systemd).
bench-mirror: deps
	cargo test --locked --release -p berth-agent --test reconcile_loop bench_long_lived_mirror -- --ignored --nocapture

# Rewrite the golden files after an intended change; review the diff.
bless:
	BERTH_BLESS=1 cargo test --locked -p berth-agent --test reconcile_loop replay
	BERTH_BLESS=1 cargo test --locked -p berth --test examples --test replay
