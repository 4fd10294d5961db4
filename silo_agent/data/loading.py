"""A silo's data, as its config names it: built-in domains, Shakespeare, label skew or JSONL files,
tokenized into training and held-out batches, with one log line per split on what ``max_length`` cut."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fcmoe.config import Config
from fcmoe.errors import DataError
from fcmoe.logs import log_event
from silo_agent.data import (ExampleBatches, Truncation, build_silo_dataset, count_truncation, encoded_length,
                             load_jsonl, tokenizer_for)

log = logging.getLogger(__name__)


@dataclass
class SiloData:
    train: ExampleBatches
    eval: ExampleBatches
    num_train: int


def load_data(config: Config) -> SiloData:
    silo, data = config.silo, config.data
    assert silo is not None
    if data.builtin is not None:
        b = data.builtin
        train, held_out = build_silo_dataset(
            silo_index=silo.index, num_silos=silo.num_silos, domains=b.domains, partition=b.partition,
            alpha=b.alpha, samples_per_silo=b.samples_per_silo, eval_fraction=b.eval_fraction, seed=b.seed)
    elif data.shakespeare is not None:
        from silo_agent.data.shakespeare import build_shakespeare_dataset  # parses ~9.5 MB: only when used
        train, held_out = build_shakespeare_dataset(
            silo_index=silo.index, num_silos=silo.num_silos, **data.shakespeare.model_dump())
    elif data.labelskew is not None:
        from silo_agent.data.classification import build_labelskew_dataset
        train, held_out = build_labelskew_dataset(
            silo_index=silo.index, num_silos=silo.num_silos, **data.labelskew.model_dump())
    else:
        assert data.train_file is not None and data.eval_file is not None
        train, held_out = load_jsonl(data.train_file), load_jsonl(data.eval_file)
    tokenizer = tokenizer_for(config.model)
    for name, examples in ((("train", train), ("held_out", held_out)) if data.labelskew is not None else ()):
        cut = count_truncation([encoded_length(tokenizer, e) for e in examples], data.max_length)
        if cut.cut:  # a cut classification record loses its label word
            raise DataError(f"data.labelskew: {cut.cut} {name} record(s) longer than data.max_length={data.max_length} "
                            f"would lose their label; set max_length to {cut.longest}")
    splits = {name: ExampleBatches(examples, tokenizer, data.max_length)
              for name, examples in (("train", train), ("held_out", held_out))}
    for name, batches in splits.items():
        log_split(name, batches.truncation)
    return SiloData(splits["train"], splits["held_out"], len(train))


def log_split(split: str, truncation: Truncation) -> None:
    """One line per split when a silo builds its data: INFO ``data_loaded`` when ``data.max_length``
    keeps every record whole, WARNING ``data_truncated`` when it cuts some (a cut record loses its
    end and its EOS, so the model is never taught to stop there; raise max_length to ``longest``)."""
    if truncation.cut:
        log_event(log, "data_truncated", level=logging.WARNING, split=split, **truncation.fields(),
                  to_fix=f"set data.max_length to {truncation.longest} or shorten the records")
    else:
        log_event(log, "data_loaded", split=split, **truncation.fields())
