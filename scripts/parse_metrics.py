#!/usr/bin/python3
"""Parses Prometheus text format (0.0.4) from stdin with the Prometheus
project's own Python parser (Debian's python3-prometheus-client) and
prints every sample as JSON: {"families": {name: type}, "samples":
[[name, labels, value], ...]}. A text the parser refuses exits 1 with its
error: the tests that read Berth's metrics through this script check the
format with a parser that is not Berth's."""

import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("python3-prometheus-client is not installed (scripts/deps.sh installs it)")


def main() -> None:
    text = sys.stdin.read()
    families = {}
    samples = []
    try:
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            for s in family.samples:
                samples.append([s.name, dict(s.labels), s.value])
    except Exception as e:  # the parser raises ValueError and friends
        sys.exit(f"not Prometheus text format: {e}")
    json.dump({"families": families, "samples": samples}, sys.stdout)


if __name__ == "__main__":
    main()
