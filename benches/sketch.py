"""Keyed count-sketch throughput on one core.

    python -m benches.sketch --params 20000000 --json

Prints, last, one JSON object: parameters sketched per second (key derivation included), for a few
bucket counts, and the relative error of inner products estimated from sketches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from crypto.sketch import count_sketch, derive_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(args.params).astype(np.float32)
    secret = os.urandom(32)
    throughput = {}
    for buckets in (256, 4096):
        best = float("inf")
        for r in range(args.repeats):
            start = time.perf_counter()
            count_sketch(x, derive_key(secret, "bench", r, "unit"), buckets)
            best = min(best, time.perf_counter() - start)
        throughput[str(buckets)] = args.params / best / 1e6
    a = rng.standard_normal(100_000).astype(np.float32)
    b = (0.5 * a + rng.standard_normal(100_000)).astype(np.float32)
    estimates = [float(count_sketch(a, k, 256) @ count_sketch(b, k, 256))
                 for k in (derive_key(secret, "bench", r, "ip") for r in range(20))]
    result = {
        "benchmark": "sketch",
        "params": args.params,
        "million_params_per_s_single_core": throughput,
        "target_million_params_per_s": 50,
        "inner_product_relative_error_k256": abs(np.mean(estimates) - float(a @ b)) / abs(float(a @ b)),
        "inner_product_relative_std_k256": float(np.std(estimates)) / abs(float(a @ b)),
    }
    if not args.json:
        print(f"{throughput} M params/s", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
