"""Parses a Prometheus text exposition (a service's /metrics) from stdin with the official Python
client's parser and prints its samples as JSON lines: {"name", "labels", "value", "family",
"type"}. Exits non-zero, naming the problem, if the text does not parse or a family has no HELP.
Used by tests/tests/e2e/metrics.rs (tutela_e2e::metrics_check)."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and others on malformed input
        print(f"the exposition does not parse: {e!r}", file=sys.stderr)
        return 1
    if not families:
        print("the exposition holds no metric family", file=sys.stderr)
        return 1
    for family in families:
        if not family.documentation:
            print(f"{family.name}: no HELP text", file=sys.stderr)
            return 1
        for sample in family.samples:
            print(
                json.dumps(
                    {
                        "name": sample.name,
                        "labels": sample.labels,
                        "value": sample.value,
                        "family": family.name,
                        "type": family.type,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
