#!/bin/sh
# What the prober costs per probe on this machine's own kernel (no
# emulation): 50 containers' worth of probes (an httpGet and a tcpSocket
# each, every second) against busybox httpd in a network namespace behind
# a veth, as a pod is. Prints the prober's user and system CPU per probe.
# Root (a namespace and a veth); `make bench-probes-host` runs it.
set -eu
seconds=${1:-30}
ns=berth-probe-bench
www=$(mktemp -d)
unwire() {
    ip netns del "$ns" 2>/dev/null || true
    ip link del bpb0 2>/dev/null || true
}
cleanup() {
    [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
    unwire
    rm -rf "$www"
}
trap cleanup EXIT
unwire
ip netns add "$ns"
ip link add bpb0 type veth peer name bpb1
ip link set bpb1 netns "$ns"
ip addr add 10.251.0.1/24 dev bpb0
ip link set bpb0 up
ip -n "$ns" addr add 10.251.0.2/24 dev bpb1
ip -n "$ns" link set bpb1 up
ip -n "$ns" link set lo up
echo ok > "$www/ready"
ip netns exec "$ns" busybox httpd -f -p 8080 -h "$www" &
server=$!
sleep 0.5
cargo build --locked --release --example probe_cost -p berth-agent
target/release/examples/probe_cost 10.251.0.2 8080 "$seconds"
