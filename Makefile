# The two commands the README promises, and a few helpers.
.PHONY: demo test deps build release bench bless

deps:
	scripts/deps.sh

build: deps
	cargo build --locked

release: deps
	cargo build --locked --release

# For now the demo is the plan a node would run for manifests/ (no root, no VM).
demo: build
	target/debug/berth validate manifests/ --images image/images.yaml
	target/debug/berth plan manifests/ --images image/images.yaml --node demo-node

test: deps
	scripts/test.sh

bench: release
	python3 scripts/bench_plan.py

# Rewrite the golden files after an intended change; review the diff.
bless:
	BERTH_BLESS=1 cargo test --locked -p berth --test examples
