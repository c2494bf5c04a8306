#!/usr/bin/env python3
"""FedAvg the way Flower computes it, for comparison with `tutela bench aggregate`.

Flower's `flwr.server.strategy.aggregate.aggregate` multiplies every layer of every result by its
number of examples, adds the weighted layers with `reduce(np.add, ...)` and divides by the total.
This script runs that computation on the same sizes as the Rust benchmark (PARAMS float32
parameters split into 4 tensors, UPDATES updates with the same sample counts, generated before
the clock starts) and reports GB/s in the same unit: bytes of updates (4 per parameter per update)
aggregated per second, 10^9 bytes to the GB. Like the Rust benchmark it times ROUNDS rounds in one
process and reports the fastest.

    python bench/fedavg_numpy.py --params 50000000 --updates 10 [--rounds 3] [--json]
"""

import argparse
import json
import sys
import time
from functools import reduce

import numpy as np

TENSORS = 4


def aggregate(results):
    """Flower's `aggregate` (flwr/server/strategy/aggregate.py): the weighted average."""
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [
        [layer * num_examples for layer in weights] for weights, num_examples in results
    ]
    weights_prime = [
        reduce(np.add, layer_updates) / num_examples_total
        for layer_updates in zip(*weighted_weights)
    ]
    return weights_prime


def split(params):
    """The Rust benchmark's split: a few tensors of nearly equal size."""
    count = min(TENSORS, params)
    return [params // count + (1 if i < params % count else 0) for i in range(count)]


def proc_status_bytes(key):
    """A line of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest is reported")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    if args.params < 1 or args.updates < 1 or args.rounds < 1:
        sys.exit("--params, --updates and --rounds must all be at least 1")

    sizes = split(args.params)
    rng = np.random.default_rng(0)
    amplitude = np.float32(1e-3)
    results = []
    for u in range(args.updates):
        # float32 uniform in (-a, a), like the Rust benchmark's updates.
        layers = [(rng.random(n, dtype=np.float32) * 2 - 1) * amplitude for n in sizes]
        results.append((layers, 1000 + (u * 7919) % 9000))

    # Reset the resident peak (Linux: 5 > clear_refs) so it reflects the aggregation.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss_before = proc_status_bytes("VmRSS:")
    round_seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        mean = aggregate(results)
        round_seconds.append(time.perf_counter() - start)
        dtype = str(mean[0].dtype)
        del mean
    seconds = min(round_seconds)
    peak = proc_status_bytes("VmHWM:")

    update_bytes = args.params * 4 * args.updates
    report = {
        "implementation": "numpy (Flower's aggregate)",
        "numpy": np.__version__,
        "params": args.params,
        "updates": args.updates,
        "tensors": len(sizes),
        "update_bytes": update_bytes,
        "seconds": seconds,
        "round_seconds": round_seconds,
        "gb_per_s": update_bytes / seconds / 1e9,
        "model_bytes": args.params * 4,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "aggregation_peak_bytes": (peak - rss_before) if peak and rss_before else None,
        "result_dtype": dtype,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
    print(
        f"FedAvg of {args.updates} updates x {args.params} parameters "
        f"({len(sizes)} tensors, {args.params * 4 / 2**20:.0f} MiB per model), numpy {np.__version__}"
    )
    rounds = ", ".join(f"{s:.3f} s" for s in round_seconds)
    print(
        f"  Flower's aggregate: {seconds:.3f} s, {report['gb_per_s']:.2f} GB/s of updates "
        f"(result {report['result_dtype']}); rounds: {rounds}"
    )
    print(
        f"  resident: before {mib(rss_before)}, peak {mib(peak)}, "
        f"aggregation added {mib(report['aggregation_peak_bytes'])}"
    )


if __name__ == "__main__":
    main()
