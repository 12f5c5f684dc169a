#!/usr/bin/env bash
# Installs what building and testing Berth needs on Debian or Ubuntu.
# Idempotent: installs only what is missing.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Build: a C toolchain and OpenSSL headers for libgit2 (https, ssh); the
# openssl tool serves HTTPS to the prober's tests;
# ssh-keygen signs commits in the signature tests, sshd serves the SSH
# remote test; nftables (the `nft` tool)
# programs Services, in the privileged tests as on the node.
# Image and QEMU tier: mmdebstrap, filesystem tools, xz and cpio (the initrd),
# QEMU and OVMF.
# Registry tests: Debian's docker-registry, htpasswd for its login, and
# busybox-static for the images the tests build and push. The metrics
# tests parse with the Prometheus project's Python parser.
packages=(build-essential pkg-config python3 python3-venv git openssl openssh-client openssh-server nftables ca-certificates libssl-dev zlib1g-dev binutils
    docker-registry apache2-utils busybox-static python3-prometheus-client
    mmdebstrap e2fsprogs dosfstools mtools fdisk zstd xz-utils cpio qemu-system-x86 qemu-utils ovmf)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "deps: installing ${missing[*]}"
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Debian's package enables a registry on all addresses, port 5000; the tests
# start their own on 127.0.0.1 with a config of their own, so it is stopped.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    need_root systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# openssh-server is for the SSH remote test, which starts its own sshd on
# 127.0.0.1 with a config of its own; the package's own server is stopped.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled ssh >/dev/null 2>&1; then
    need_root systemctl disable --now ssh ssh.socket >/dev/null 2>&1 || true
fi

# Rust: the workspace needs edition 2024 and Rust 1.95 or newer.
required="1.95"
if ! command -v cargo >/dev/null 2>&1; then
    if apt-cache show rustup >/dev/null 2>&1; then
        echo "deps: installing rustup from the distribution"
        need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustup
        rustup default stable
    else
        echo "deps: cargo is missing and this distribution has no rustup package;" >&2
        echo "      install Rust $required or newer from https://rustup.rs and run again" >&2
        exit 1
    fi
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$required" "$have" | sort -V | head -n1)" != "$required" ]; then
    echo "deps: rustc $have is older than $required; run 'rustup update stable'" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then rustup component add "$component"; else
            echo "deps: cargo $component is missing" >&2; exit 1
        fi
    fi
done

# The grpc probe's test talks to grpcio's own health server (from PyPI),
# in a virtual environment under target/.
venv="$(cd "$(dirname "$0")/.." && pwd)/target/grpc-venv"
if ! "$venv/bin/python" -c 'import grpc, grpc_health.v1.health' 2>/dev/null; then
    echo "deps: installing grpcio into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check grpcio==1.85.4 grpcio-health-checking==1.85.1
fi
