#!/usr/bin/env python3
"""Load + plan benchmark: generates N pods with Services and ConfigMaps,
runs `berth plan` on them several times, and prints wall time, the load and
plan stage times (from `--timings`), and the peak resident memory.

Usage: scripts/bench_plan.py [--pods 10000] [--runs 5] [--berth target/release/berth]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PER_FILE = 10

POD = """apiVersion: v1
kind: Pod
metadata:
  name: app-{i}
  namespace: bench
  labels:
    app: app-{i}
    tier: {tier}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f", "-p", "8080"]
      env:
        - name: GREETING
          valueFrom:
            configMapKeyRef:
              name: config-{i}
              key: greeting
        - name: PORT
          value: "8080"
      resources:
        requests:
          cpu: 50m
          memory: 32Mi
        limits:
          cpu: 200m
          memory: 64Mi
      ports:
        - name: http
          containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: app-{i}
  namespace: bench
spec:
  selector:
    app: app-{i}
  ports:
    - name: http
      port: 80
      targetPort: http
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: config-{i}
  namespace: bench
data:
  greeting: "hello from {i}"
"""


def generate(root, pods):
    with open(os.path.join(root, "namespace.yaml"), "w") as f:
        f.write("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n")
    total = 0
    for start in range(0, pods, PER_FILE):
        docs = [POD.format(i=i, tier="web" if i % 2 else "api") for i in range(start, min(start + PER_FILE, pods))]
        path = os.path.join(root, f"apps-{start // PER_FILE:05d}.yaml")
        with open(path, "w") as f:
            f.write("---\n".join(docs))
        total += os.path.getsize(path)
    return total


def run_once(berth, root):
    args = [berth, "plan", root, "--node", "bench", "--node-memory", "256Gi", "--node-cpus", "64",
            "--revision", "bench", "--output", "json", "--timings"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"berth plan failed with exit code {code}:\n{stderr}")
    m = re.search(r"load ([\d.]+) ms \((\d+) objects.*plan ([\d.]+) ms \((\d+) pods, (\d+) actions", stderr)
    if not m:
        sys.exit(f"no timings in berth's output:\n{stderr}")
    return {
        "wall_ms": wall * 1000,
        "load_ms": float(m.group(1)),
        "plan_ms": float(m.group(3)),
        "objects": int(m.group(2)),
        "pods": int(m.group(4)),
        "actions": int(m.group(5)),
        "max_rss_mib": usage.ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--berth", default="target/release/berth")
    opts = parser.parse_args()
    if not os.access(opts.berth, os.X_OK):
        sys.exit(f"{opts.berth} is not built: run `cargo build --release --locked` first")
    root = tempfile.mkdtemp(prefix="berth-bench-")
    try:
        size = generate(root, opts.pods)
        runs = [run_once(opts.berth, root) for _ in range(opts.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = runs[0]
    if first["pods"] != opts.pods:
        sys.exit(f"expected {opts.pods} pods in the plan, got {first['pods']}")
    med = lambda key: statistics.median(r[key] for r in runs)
    print(f"corpus: {opts.pods} pods, {first['objects']} objects, {size / 1e6:.1f} MB of YAML in {opts.pods // PER_FILE + 1} files")
    print(f"runs: {opts.runs} on {os.cpu_count()} CPUs; medians:")
    print(f"  load (read, parse, decode, validate): {med('load_ms'):8.1f} ms")
    print(f"  plan (select, desired, diff, order):  {med('plan_ms'):8.1f} ms")
    print(f"  load + plan:                          {med('load_ms') + med('plan_ms'):8.1f} ms")
    print(f"  whole command incl. JSON output:      {med('wall_ms'):8.1f} ms ({first['actions']} actions)")
    print(f"  peak resident memory:                 {max(r['max_rss_mib'] for r in runs):8.1f} MiB")


if __name__ == "__main__":
    main()
