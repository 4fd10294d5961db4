"""The label-skew benchmark's starting model: a top-1 MoE pre-trained centrally on unlabelled text.

A federation of a random-initialised MoE tells nothing about expert specialisation: its routing
shares carry no signal, so importance weighting and per-expert consensus have nothing to work on
(docs/algorithm.md). The paper's setting starts from a pretrained Switch-style MoE; here a tiny
Mixtral-family model (``benchmark.pretrain.builtin``: top-1 over >= 8 experts, byte tokens) is
trained on every parameter, next-token prediction, on the label-skew source's passages **without
their labels** — a recorded, seeded step (``pretrain.json``) whose checkpoint every method and seed
then loads with ``model.source: local``. Passages of any test set of the benchmark's settings
(seeds ``0 .. held_out_seeds-1``) are left out of the text, whole scene blocks at a time.

Also measured here, before any federation: the routing entropy per label (entropy of the label's
top-1 expert histogram, per layer) beside the entropy of all labels together; their gap is the
information the routing carries about the label (mutual information), i.e. how far the experts
already specialise by label.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fcmoe.errors import ConfigError

RECORD = "pretrain.json"


def held_out_texts(settings: Sequence[dict], seeds: int) -> set[str]:
    """Every test passage (global and every silo's own) of the label-skew ``settings`` for seeds
    ``0 .. seeds-1``, the bench's own data seeds."""
    out: set[str] = set()
    for setting in settings:
        for seed in range(seeds):
            split = setting_split(setting, seed)
            for e in list(split.global_test) + [e for part in split.local_test for e in part]:
                out.add(_passage(e.prompt, setting["labelskew"]["source"]))
    return out


def setting_split(setting: dict, seed: int):  # -> LabelSkewSplit
    """The split of a benchmark setting's ``labelskew`` data for one of the benchmark's seeds."""
    from silo_agent.data.classification import labelskew_split

    keys = {k: v for k, v in setting["labelskew"].items() if k != "seed"}
    keys["labels"] = None if keys.get("labels") is None else tuple(keys["labels"])
    return labelskew_split(num_silos=setting["silos"], seed=seed, **keys)


def _passage(prompt: str, source: str) -> str:
    from silo_agent.data.classification import CUES

    return prompt[: -len(CUES[source])]


def pretraining_texts(labelskew: dict, held_out: set[str]) -> tuple[list[str], int]:
    """The unlabelled passages of ``labelskew``'s source and labels, minus every scene block (group)
    holding a held-out passage; and how many passages that left out."""
    from silo_agent.data.classification import DEFAULT_LABELS, normalise_text, passage_pool

    labels = tuple(labelskew.get("labels") or DEFAULT_LABELS[labelskew["source"]])
    pool = passage_pool(labelskew["source"], labels, labelskew["spelling"], labelskew["passage_lines"],
                 labelskew["min_chars"], labelskew["max_chars"],
                 None if labelskew.get("data_dir") is None else str(labelskew["data_dir"]))
    passages = [p for per_label in pool for p in per_label]
    tainted = {p.group for p in passages if normalise_text(p.text) in held_out}
    kept = [p.text for p in passages if p.group not in tainted]
    return kept, len(passages) - len(kept)


def routing_entropy(model, tok, examples: Sequence, labels: Sequence[str], num_experts: int,
                    batch_size: int = 32) -> dict:
    """Per layer: the entropy (nats) of each label's top-1 expert histogram over its test prompts'
    tokens, of all labels' tokens together, and the mutual information between routing and label
    (the latter minus the token-weighted mean of the former). ``log(num_experts)`` is uniform use."""
    import torch

    from silo_agent.data import IGNORE_INDEX, collate
    from silo_agent.routing import RoutingMeter
    from silo_agent.training import forward_logits

    mass: dict[str, dict[int, np.ndarray]] = {}
    tokens: dict[str, float] = {}
    model.eval()
    for label in labels:
        rows = []
        for e in (e for e in examples if e.domain == label):
            ids = ([] if tok.bos_token_id is None else [tok.bos_token_id]) + tok.encode(e.prompt)
            rows.append((ids, [IGNORE_INDEX] + ids[1:]))
        meter = RoutingMeter()
        with torch.no_grad(), meter.attached(model):
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start:start + batch_size], tok.pad_token_id)
                meter.mask = batch["attention_mask"].reshape(-1).bool()
                forward_logits(model, batch)
        mass[label] = {layer: m.cpu().numpy() for layer, m in meter.mass.items()}
        tokens[label] = next(iter(meter.tokens.values()), 0.0)
    if not any(mass.values()):
        raise ConfigError("the routing meter saw no MoE layer of the pretrained model")
    out = {}
    for layer in sorted(next(iter(mass.values()))):
        per_label = {label: _entropy(mass[label][layer]) for label in labels}
        overall = _entropy(sum(mass[label][layer] for label in labels))
        mean = sum(per_label[k] * tokens[k] for k in labels) / max(sum(tokens.values()), 1.0)
        out[str(layer)] = {"per_label": per_label, "all_labels": overall, "mutual_information": overall - mean,
                           "uniform": math.log(num_experts)}
    return out


def _entropy(counts: np.ndarray) -> float:
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum() if p.sum() > 0 else p
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def pretrain_moe(recipe, settings: Sequence[dict], path: Path, max_length: int) -> dict:
    """Build ``recipe.builtin``, train all of it on the unlabelled text, save it (with the byte
    tokenizer) into ``path`` (written aside, then renamed) with ``pretrain.json``; returns the record."""
    import torch

    from fcmoe.config import ModelConfig
    from fcmoe.model.build import build_base_model
    from fcmoe.model.tokenizer import byte_tokenizer
    from fcmoe.model.upcycle import publish_dir
    from fcmoe.plan import RoundPlan
    from silo_agent.data import ByteTokenizer, Example, ExampleBatches
    from silo_agent.training import evaluate, train_locally

    labelled = [s for s in settings if s.get("labelskew")]
    if not labelled:
        raise ConfigError("benchmark.pretrain needs a setting with labelskew data (its source is the text)")
    started = time.perf_counter()
    held_out = held_out_texts(labelled, recipe.held_out_seeds)
    texts, left_out = pretraining_texts(labelled[0]["labelskew"], held_out)
    rng = np.random.default_rng(recipe.seed)
    order = rng.permutation(len(texts))
    evaluation = [Example("", texts[i], "text") for i in order[:256]]
    train = [Example("", texts[i], "text") for i in order[256:]]
    tok = ByteTokenizer()
    spec = ModelConfig.model_validate({"source": "builtin", "builtin": recipe.builtin.model_dump()})
    model = build_base_model(spec)
    for p in model.parameters():
        p.requires_grad_(True)
    eval_batches = ExampleBatches(evaluation, tok, max_length)
    before = _mean_loss(evaluate(model, eval_batches, torch.device("cpu"), 32))
    result = train_locally(model, ExampleBatches(train, tok, max_length),
                           RoundPlan(local_steps=recipe.steps, batch_size=recipe.batch_size,
                                     learning_rate=recipe.learning_rate, seed=recipe.seed), torch.device("cpu"))
    after = _mean_loss(evaluate(model, eval_batches, torch.device("cpu"), 32))
    first = labelled[0]
    split = setting_split(first, 0)
    entropy = routing_entropy(model, tok, split.global_test, split.labels, recipe.builtin.num_experts)
    record = {
        "method": "every parameter trained on unlabelled passages of the label-skew source (next-token loss); "
                  "no label word, no test passage of the benchmark's seeds",
        "builtin": recipe.builtin.model_dump(), "steps": recipe.steps, "batch_size": recipe.batch_size,
        "learning_rate": recipe.learning_rate, "seed": recipe.seed, "max_length": max_length,
        "texts": len(train), "left_out_for_tests": left_out, "held_out_seeds": recipe.held_out_seeds,
        "loss_before": before, "loss_after": after, "train_loss_last": result.loss_last,
        "seconds": time.perf_counter() - started,
        "routing_entropy": {"test_set": f"global test set of setting {first['name']!r}, seed 0", "layers": entropy},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    publish_dir(tmp, path)
    print(f"model pre-trained in {record['seconds']:.0f} s (held-out loss {before:.3f} -> {after:.3f}): {path}",
          file=sys.stderr)
    return record


def _mean_loss(losses: dict[str, tuple[float, int]]) -> float:
    """Per-token loss over all domains (``evaluate`` gives summed losses and token counts)."""
    return sum(s for s, _ in losses.values()) / max(sum(n for _, n in losses.values()), 1)
