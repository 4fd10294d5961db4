"""Do the ratio benchmarks mean the same under load? Each one run without and with CPU-bound neighbours.

    python -m benches.load_robust --json                 # --threads 1: about 3-4 minutes on 2 cores
    python -m benches.load_robust --threads 1 0 --json   # and with the benchmarks' own thread counts

Runs ``benches.secagg`` and ``benches.dp`` (small sizes) once as they are and once with ``--load N``
(N CPU-bound processes beside them, default 1; with ``--load-period S`` they are busy S seconds,
idle S seconds, and so on), each as its own process, and compares every ratio they report: masking
and CKKS rounds against plaintext ones (FedAvg), FC-MoE's masked rounds against its plaintext ones,
a DP step against a plain one (LoRA, full experts). A ratio agrees when the
loaded figure is within ``--tolerance`` (default 20 %) of the unloaded one, relative to the unloaded
one. ``--threads`` is passed to both benchmarks (0: their own default, torch using both cores):
with as many torch threads as cores, a CPU-bound neighbour slows torch's multi-threaded work (every
parallel region waits for its slowest thread) far more than the single-threaded crypto, which changes
the ratio itself, whatever the schedule. For contrast it also compares, without counting it, the
DP step-time ratio measured the former way (each variant alone, one after the other). Prints, last,
one JSON object; exits 0 when every run produced its JSON, whether or not the ratios agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECAGG = ["--silos", "4", "--params", "50000", "--rounds", "5", "--local-steps", "1", "--repeats", "2",
          "--no-flower", "--fcmoe"]
DP = ["--batch-size", "16", "--steps", "50"]


def _figures(bench: str, result: dict) -> dict[str, tuple[float | None, list[float] | None]]:
    """The ratios a run reports, by name, each with its quartiles where the benchmark gives them; the
    ``reference:`` ones are not part of the claim."""
    def quartiles(spread: dict | None) -> list[float] | None:
        return [spread["q1"], spread["q3"]] if spread else None

    if bench == "secagg":
        modes, fcmoe = result.get("modes", {}), result.get("fcmoe_modes", {})
        picked = {"secagg masking / none": modes.get("masking", {}), "secagg ckks / none": modes.get("ckks", {}),
                  "secagg fcmoe masking / none": fcmoe.get("masking", {})}
        return {name: (r.get("round_ratio_to_none"), quartiles(r.get("round_ratio"))) for name, r in picked.items()}
    out: dict[str, tuple[float | None, list[float] | None]] = {}
    for r in result.get("results", []):
        out[f"dp {r['mode']} dp / plain"] = (r.get("time_ratio"), quartiles(r.get("time_ratio_spread")))
    for r in result.get("results", []):
        out[f"reference: dp {r['mode']} dp / plain, each alone in turn"] = (r.get("sequential_time_ratio"), None)
    return out


def compare(unloaded: dict[str, float | None], loaded: dict[str, float | None], tolerance: float,
            quartiles: dict[str, dict] | None = None) -> dict:
    """Per ratio: both figures, ``relative_difference`` = |loaded - unloaded| / unloaded, and ``agree``
    (None where either run has no figure: an aborted mode); ``quartiles[name]``, where given, is kept
    with it (each run's quartiles of the per-pair ratios)."""
    out = {}
    for name in unloaded.keys() | loaded.keys():
        a, b = unloaded.get(name), loaded.get(name)
        rel = abs(b - a) / a if a and b is not None else None
        out[name] = {"without_load": a, "with_load": b, "relative_difference": rel,
                     "agree": rel <= tolerance if rel is not None else None}
        if quartiles and name in quartiles:
            out[name]["quartiles"] = quartiles[name]
    return dict(sorted(out.items()))


def run_bench(bench: str, args: list[str], load: int, timeout: float, period: float = 0.0) -> dict:
    command = [sys.executable, "-m", f"benches.{bench}", *args, "--json"]
    command += (["--load", str(load)] + (["--load-period", str(period)] if period else [])) if load else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": command[1:], "ok": False, "reason": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"command": command[1:], "ok": False, "wall_seconds": wall,
                "reason": f"exit {proc.returncode}, no JSON: {tail}"}
    return {"command": command[1:], "ok": True, "exit": proc.returncode, "wall_seconds": wall, "result": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=int, default=1, help="CPU-bound processes in the loaded runs (default 1)")
    parser.add_argument("--load-period", type=float, default=0.0,
                        help="seconds the load is busy, then idle, and so on (default: busy throughout)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="the benchmarks' --threads, one pair of runs each (0: their own default; default 1)")
    parser.add_argument("--tolerance", type=float, default=0.2, help="relative difference that still agrees")
    parser.add_argument("--benches", nargs="+", default=["secagg", "dp"], choices=["secagg", "dp"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each benchmark run")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.load < 1 or any(t < 0 for t in args.threads):
        parser.error("--load must be at least 1, --threads 0 or more")
    start = time.perf_counter()
    runs: dict[str, dict] = {}
    ratios: dict[str, dict] = {}
    for threads in args.threads:
        setting = f"threads {threads}" if threads else "default threads"
        for bench in args.benches:
            sizes = (SECAGG if bench == "secagg" else DP) + (["--threads", str(threads)] if threads else [])
            pair = {}
            for label, load in (("without_load", 0), ("with_load", args.load)):
                pair[label] = run_bench(bench, sizes, load, args.timeout, args.load_period)
                if not args.json:
                    ok = pair[label]
                    print(f"{bench}, {setting}, {label}: {'ok' if ok['ok'] else ok['reason']} "
                          f"({ok.get('wall_seconds', 0):.0f} s)", file=sys.stderr)
            runs[f"{bench}, {setting}"] = {
                label: {k: v for k, v in r.items() if k != "result"}
                | ({"load": r["result"].get("load"), "aborted": r["result"].get("aborted")} if r["ok"] else {})
                for label, r in pair.items()}
            figures = {label: {f"{name} ({setting})": v for name, v in _figures(bench, r["result"]).items()}
                       if r["ok"] else {} for label, r in pair.items()}
            spreads: dict[str, dict] = {}
            for label, named in figures.items():
                for name, (_, q) in named.items():
                    if q is not None:
                        spreads.setdefault(name, {})[label] = q
            ratios.update(compare({n: v for n, (v, _) in figures["without_load"].items()},
                                  {n: v for n, (v, _) in figures["with_load"].items()}, args.tolerance, spreads))
    claimed = {k: v for k, v in ratios.items() if not k.startswith("reference:")}
    verdicts = [v["agree"] for v in claimed.values()]
    summary = {
        "benchmark": "load_robust",
        "load_processes": args.load,
        "load_period_seconds": args.load_period or None,
        "threads": args.threads,
        "tolerance": args.tolerance,
        "sizes": {"secagg": SECAGG, "dp": DP},
        "ratios": ratios,
        "agree": sum(1 for v in verdicts if v), "disagree": sum(1 for v in verdicts if v is False),
        "missing": sum(1 for v in verdicts if v is None),
        "all_agree": bool(verdicts) and all(v is True for v in verdicts),
        "runs": runs,
        "wall_seconds": time.perf_counter() - start,
    }
    print(json.dumps(summary))
    return 0 if all(r["ok"] for pair in runs.values() for r in pair.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
