#!/usr/bin/env python3
"""Load + plan benchmark: generates N pods with Services and ConfigMaps,
runs `berth plan` on them several times, and prints wall time, the load and
plan stage times (from `--timings`), and the peak resident memory, for each
shape of repository:

- baseline: one namespace, a Service per pod, a node that fits every pod;
- full-node: the same corpus on a node of 2 CPUs and 4Gi that fits few of
  them (admission refuses the rest, each with a diagnostic);
- wide: 7 namespaces, requests and limits on every pod, and Services that
  each select about 200 pods by a shared label.

Usage: scripts/bench_plan.py [--pods 10000] [--runs 5] [--shape all|baseline|full-node|wide]
                             [--berth target/release/berth]
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


WIDE_POD = """apiVersion: v1
kind: Pod
metadata:
  name: app-{i}
  namespace: ns-{ns}
  labels:
    app: app-{i}
    group: group-{group}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f", "-p", "8080"]
      envFrom:
        - configMapRef:
            name: config-{i}
      resources:
        requests:
          cpu: 100m
          memory: 64Mi
        limits:
          cpu: 250m
          memory: 128Mi
      ports:
        - name: http
          containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: svc-{i}
  namespace: ns-{ns}
spec:
  selector:
    group: group-{group}
  ports:
    - name: http
      port: 80
      targetPort: http
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: config-{i}
  namespace: ns-{ns}
data:
  GREETING: "hello from {i}"
"""

NAMESPACES = 7
WIDE_FILES = 500


def generate_wide(root, pods):
    with open(os.path.join(root, "namespaces.yaml"), "w") as f:
        f.write("---\n".join(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{n}\n" for n in range(NAMESPACES)))
    total = 0
    per_file = max(1, -(-pods // WIDE_FILES))
    # About 200 pods share a group, and each group lives in one namespace.
    groups = max(1, pods // 200)
    for start in range(0, pods, per_file):
        docs = []
        for i in range(start, min(start + per_file, pods)):
            group = i % groups
            docs.append(WIDE_POD.format(i=i, ns=group % NAMESPACES, group=group))
        path = os.path.join(root, f"apps-{start // per_file:05d}.yaml")
        with open(path, "w") as f:
            f.write("---\n".join(docs))
        total += os.path.getsize(path)
    return total


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


def run_once(berth, root, node):
    args = [berth, "plan", root, "--node", "bench", *node, "--revision", "bench", "--output", "json", "--timings"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    # 1: some pods were refused (a full node); the plan is still made.
    if code not in (0, 1):
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


SHAPES = {
    # name: (generator, node flags, pods the plan must keep; None = all)
    "baseline": (generate, ["--node-memory", "2Ti", "--node-cpus", "2000"], None),
    "full-node": (generate, ["--node-memory", "4Gi", "--node-cpus", "2"], "some"),
    "wide": (generate_wide, ["--node-memory", "2Ti", "--node-cpus", "2000"], None),
}


def bench(opts, shape):
    gen, node, expect = SHAPES[shape]
    root = tempfile.mkdtemp(prefix="berth-bench-")
    try:
        size = gen(root, opts.pods)
        files = len(os.listdir(root))
        runs = [run_once(opts.berth, root, node) for _ in range(opts.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = runs[0]
    if expect is None and first["pods"] != opts.pods:
        sys.exit(f"{shape}: expected {opts.pods} pods in the plan, got {first['pods']}")
    if expect == "some" and not 0 < first["pods"] < opts.pods:
        sys.exit(f"{shape}: expected a node that fits some of the {opts.pods} pods, got {first['pods']}")
    med = lambda key: statistics.median(r[key] for r in runs)
    print(f"shape {shape}: {opts.pods} pods ({first['pods']} admitted), {first['objects']} objects, {size / 1e6:.1f} MB of YAML in {files} files")
    print(f"  runs: {opts.runs} on {os.cpu_count()} CPUs; medians:")
    print(f"  load (read, parse, decode, validate): {med('load_ms'):8.1f} ms")
    print(f"  plan (select, desired, diff, order):  {med('plan_ms'):8.1f} ms")
    print(f"  load + plan:                          {med('load_ms') + med('plan_ms'):8.1f} ms")
    print(f"  whole command incl. JSON output:      {med('wall_ms'):8.1f} ms ({first['actions']} actions)")
    print(f"  peak resident memory:                 {max(r['max_rss_mib'] for r in runs):8.1f} MiB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", default="all", choices=["all", *SHAPES])
    parser.add_argument("--berth", default="target/release/berth")
    opts = parser.parse_args()
    if not os.access(opts.berth, os.X_OK):
        sys.exit(f"{opts.berth} is not built: run `cargo build --release --locked` first")
    for shape in (SHAPES if opts.shape == "all" else [opts.shape]):
        bench(opts, shape)


if __name__ == "__main__":
    main()
