"""CKKS (``mode: ckks``) throughput, ciphertext size and weighted-sum error on one process.

    python -m benches.ckks --floats 1000000 --json

Prints, last, one JSON object: encrypt, add, scale and decrypt throughput in floats per second
(serialization and parsing included, since every ciphertext crosses the network as bytes), bytes
per float of fresh and scaled ciphertexts, and the largest absolute error of an 8-silo weighted
sum of vectors uniform in [-1, 1] with weights in (0, 1], computed under the public context.

Measured on one core of a 2-core x86 VM at the earlier 40-bit-scale parameters with
``--floats 1000000``: a fresh ciphertext was about 81 bytes per float (a float32 is 4) and is about
88 at the 58-bit scale, 57 after one ``scale``; the public context is about 465 kB. Encryption runs
at about 0.84 M floats/s, ``add`` of two serialized vectors at about 1.7 M and ``scale`` at about
2.4 M; ``decrypt_sum`` decodes complex slots too (about 2.5 ms per 5000-float vector). Each chunk is
a separate TenSEAL vector, so these calls use one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import tenseal as ts

from crypto import ckks

SILOS = 8


def _best_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (and the last result): the minimum is the least noisy estimate."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def _weighted_sum_error(secret_ctx: ts.Context, public_ctx: ts.Context, floats: int,
                        rng: np.random.Generator) -> float:
    """Largest |decrypted - plaintext| of ``sum_i alpha_i x_i`` over SILOS silos, summed under the public context."""
    vectors = rng.uniform(-1, 1, size=(SILOS, floats))
    alphas = rng.uniform(0, 1, size=SILOS)
    alphas[alphas == 0] = 1.0
    total = None
    for vector, alpha in zip(vectors, alphas, strict=True):
        term = ckks.scale(public_ctx, ckks.encrypt(public_ctx, vector), float(alpha))
        total = term if total is None else ckks.add(public_ctx, total, term)
    out = ckks.decrypt_sum(secret_ctx, total, floats, contributors=SILOS, min_group_size=SILOS)
    return float(np.max(np.abs(out - alphas @ vectors)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floats", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    params = ckks.CkksParams()
    secret_ctx = ckks.new_secret_context(params)
    public_bytes = ckks.public_context_bytes(secret_ctx)
    public_ctx = ckks.load_public_context(public_bytes, params)
    x = rng.uniform(-1, 1, args.floats)

    encrypt_s, fresh = _best_seconds(lambda: ckks.encrypt(public_ctx, x), args.repeats)
    add_s, _ = _best_seconds(lambda: ckks.add(public_ctx, fresh, fresh), args.repeats)
    scale_s, scaled = _best_seconds(lambda: ckks.scale(public_ctx, fresh, 0.5), args.repeats)
    decrypt_s, _ = _best_seconds(
        lambda: ckks.decrypt_sum(secret_ctx, scaled, args.floats, SILOS, SILOS), args.repeats)
    result = {
        "benchmark": "ckks",
        "floats": args.floats,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "scale_bits": params.scale_bits,
        "encrypt_floats_per_s": args.floats / encrypt_s,
        "add_floats_per_s": args.floats / add_s,
        "scale_floats_per_s": args.floats / scale_s,
        "decrypt_floats_per_s": args.floats / decrypt_s,
        "bytes_per_float": sum(map(len, fresh)) / args.floats,
        "bytes_per_float_after_scale": sum(map(len, scaled)) / args.floats,
        "public_context_bytes": len(public_bytes),
        "weighted_sum_silos": SILOS,
        "weighted_sum_max_abs_error": _weighted_sum_error(secret_ctx, public_ctx, args.floats, rng),
    }
    if not args.json:
        print(f"encrypt {result['encrypt_floats_per_s'] / 1e6:.2f} M floats/s, "
              f"{result['bytes_per_float']:.1f} B/float, "
              f"max error {result['weighted_sum_max_abs_error']:.2e}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
