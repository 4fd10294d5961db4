"""Round metrics as reported by silos (the aggregator holds no data), pooled and written to disk.

A silo reports summed token loss and token counts per domain; pooling sums both over silos, so the
pooled loss of a domain is the token-weighted mean over every silo that holds that domain. The
headline figure is the unweighted mean over domains. Files: metrics.jsonl and metrics.csv (rewritten
atomically after every round), loss.png.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fcmoe.fileio import write_atomic
from protos import fcmoe_pb2 as pb


@dataclass
class DomainPool:
    loss_sum: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, entries: Iterable[pb.DomainLoss]) -> None:
        for e in entries:
            self.loss_sum[e.domain] = self.loss_sum.get(e.domain, 0.0) + e.loss_sum
            self.tokens[e.domain] = self.tokens.get(e.domain, 0) + e.tokens

    def by_domain(self) -> dict[str, float]:
        return {d: self.loss_sum[d] / self.tokens[d] for d in sorted(self.tokens) if self.tokens[d] > 0}

    def mean(self) -> float | None:
        losses = self.by_domain()
        return sum(losses.values()) / len(losses) if losses else None


@dataclass
class RoundRecord:
    """Everything known about model version ``round`` (0 = the initial global model)."""

    round: int
    global_pool: DomainPool = field(default_factory=DomainPool)
    local_pool: DomainPool = field(default_factory=DomainPool)
    stats: dict[str, float] = field(default_factory=dict)
    per_silo: dict[str, dict[str, float]] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        row: dict[str, object] = {"round": self.round, "global_loss": self.global_pool.mean(),
                                  "local_loss": self.local_pool.mean()}
        row.update({f"global_loss/{d}": v for d, v in self.global_pool.by_domain().items()})
        row.update({f"local_loss/{d}": v for d, v in self.local_pool.by_domain().items()})
        row.update(self.stats)
        if self.per_silo:
            row["silos"] = self.per_silo
        return row


class MetricsLog:
    def __init__(self, directory: Path):
        self.directory = directory
        self.records: dict[int, RoundRecord] = {}

    def record(self, round_: int) -> RoundRecord:
        return self.records.setdefault(round_, RoundRecord(round_))

    def rows(self) -> list[dict[str, object]]:
        return [self.records[r].row() for r in sorted(self.records)]

    def state(self) -> list[dict[str, object]]:
        """Everything recorded so far, raw (pooled sums, not means), for a checkpoint."""
        return [asdict(self.records[r]) for r in sorted(self.records)]

    def restore(self, state: Iterable[Mapping[str, object]]) -> None:
        """Back to what :meth:`state` saved (a resumed run goes on with the same records)."""
        self.records = {}
        for raw in state:
            rec = RoundRecord(int(raw["round"]), DomainPool(**raw["global_pool"]), DomainPool(**raw["local_pool"]),
                              dict(raw["stats"]), {s: dict(v) for s, v in raw["per_silo"].items()})
            self.records[rec.round] = rec

    def write(self) -> None:
        rows = self.rows()
        write_atomic(self.directory / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        flat = [{k: v for k, v in r.items() if k != "silos"} for r in rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        write_atomic(self.directory / "metrics.csv", buf.getvalue())

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("global_loss", "-o"), ("local_loss", "--s")):
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "))
        ax.set_xlabel("round (model version)")
        ax.set_ylabel("held-out loss (mean over domains)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.directory / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def round_stats(per_silo: Mapping[str, Mapping[str, float]], contributors: int, elapsed: float,
                diagnostics: Mapping[str, float], *, secure_seconds: float, plan_seconds: float,
                sketch_stage_seconds: float, aggregate_seconds: float) -> dict[str, float]:
    """A closed round's statistics row, from what each silo reported and what the aggregator timed.
    Silos that declined (no ``train_seconds``) count in none of the means."""
    trained = [s for s in per_silo.values() if "train_seconds" in s]
    slowest = max((s["train_seconds"] for s in trained), default=0.0)
    tokens = sum(s["tokens"] for s in trained)
    train_s = sum(s["train_seconds"] for s in trained)
    return {**{k: float(v) for k, v in diagnostics.items()},
            "updates": contributors,
            "round_seconds": elapsed,
            "slowest_train_seconds": slowest,
            "overhead": (elapsed - slowest) / elapsed if elapsed > 0 else 0.0,
            "bytes_up_mean": float(np.mean([s.get("bytes_up", 0) + s["report_bytes"] + s.get("secure_bytes", 0)
                                            for s in trained])) if trained else 0.0,
            "bytes_down_mean": float(np.mean([s["bytes_down"] for s in trained])) if trained else 0.0,
            "aggregator_secure_seconds": secure_seconds,
            # the strategy's maths: planning (FC-MoE: importance, sketch consensus, groups) and
            # aggregation (FC-MoE: projection and combination of group sums, the server step)
            "plan_seconds": plan_seconds,
            "sketch_stage_seconds": sketch_stage_seconds,  # FC-MoE: masked sketches, their unmask, agreement
            "aggregate_seconds": aggregate_seconds,
            "train_tokens_per_s": tokens / train_s if train_s > 0 else 0.0}


def final_table(rows: list[Mapping[str, object]]) -> str:
    """Per-domain held-out loss: initial global, final global, final personalised (local); "final"
    is the newest version measured (federation.evaluation may skip rounds and the final evaluation)."""
    if not rows:
        return "(no metrics)"
    first = rows[0]
    last = next((r for r in reversed(rows) if r.get("global_loss") is not None), rows[-1])
    last_local = next((r for r in reversed(rows) if r.get("local_loss") is not None), {})
    domains = sorted(k.split("/", 1)[1] for k in first if k.startswith("global_loss/"))

    def cell(value: object, width: int) -> str:
        return f"{value:>{width}.4f}" if isinstance(value, float) else f"{'-':>{width}}"

    lines = [f"{'domain':<14}{'round 0':>10}{'round ' + str(last['round']):>12}{'local':>10}"]
    for d in domains + ["(mean)"]:
        suffix = "" if d == "(mean)" else f"/{d}"
        lines.append(f"{d:<14}" + cell(first.get("global_loss" + suffix), 10)
                     + cell(last.get("global_loss" + suffix), 12) + cell(last_local.get("local_loss" + suffix), 10))
    return "\n".join(lines)
