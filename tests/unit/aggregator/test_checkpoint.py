"""What the aggregator keeps on disk to resume a run: file logic, no network."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import silo_config, smoke_config

from aggregator.checkpoint import (RunRecord, archive_previous, resume_point, save_checkpoint, write_run_record)
from crypto.pki import ensure_pki
from fcmoe.config import parse_config
from fcmoe.errors import ConfigError
from fcmoe.launch.inprocess import run_in_process


def _save(root, version, value=0.0):
    save_checkpoint(root, version, {"u": np.full(4, value, np.float32)}, {"m/u": np.ones(4, np.float32)},
                    {"version": version, "metrics": [{"round": version}]})


def test_resume_point_reads_the_latest_checkpoint_and_counts_attempts_on(tmp_path):
    root = tmp_path / "checkpoints"
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedadam", round=3, attempt=1))
    for v in range(3):
        _save(root, v, float(v))
    point = resume_point(root, "lay", "fp", "fedadam")
    assert point is not None and point.record.run_id == "r1" and point.checkpoint.version == 2
    np.testing.assert_array_equal(point.checkpoint.global_units["u"], np.full(4, 2.0))
    assert point.checkpoint.strategy_state.keys() == {"m/u"} and point.checkpoint.state["metrics"] == [{"round": 2}]
    assert point.first_attempt == 2  # attempts 0 and 1 of round 3 may have gone out
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedadam", round=2, attempt=5))
    assert resume_point(root, "lay", "fp", "fedadam").first_attempt == 0  # round 3 never started


def test_a_finished_run_is_not_resumed_and_another_model_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    assert resume_point(root, "lay", "fp", "fedavg") is None  # nothing there
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedavg"))
    _save(root, 0)
    with pytest.raises(ConfigError, match="unfinished run r1 with another model layout, strategy"):
        resume_point(root, "other", "fp", "fedadam")
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedavg", finished=True))
    assert resume_point(root, "other", "fp", "fedadam") is None


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedavg"))
    (root / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable run record"):
        resume_point(root, "lay", "fp", "fedavg")
    write_run_record(root, RunRecord("r1", "lay", "fp", "fedavg"))
    with pytest.raises(ConfigError, match="latest checkpoint unreadable"):
        resume_point(root, "lay", "fp", "fedavg")


def test_old_checkpoints_are_pruned_around_the_newest_and_a_new_run_archives_the_old_one(tmp_path):
    root = tmp_path / "checkpoints"
    write_run_record(root, RunRecord("old", "lay", "fp", "fedavg", finished=True))
    for v in range(6):
        _save(root, v)
    assert sorted(p.name for p in root.glob("round-*")) == ["round-0003", "round-0004", "round-0005"]
    archived = archive_previous(root)
    assert archived == tmp_path / "checkpoints.old" and (archived / "round-0005").is_dir() and not root.exists()
    _save(root, 0)  # the new run's first checkpoint survives: nothing newer is left to outrank it
    assert (root / "latest").read_text().strip() == "round-0000" and (root / "round-0000").is_dir()


def test_an_archive_under_the_same_label_is_kept(tmp_path):
    """Two runs with one id (a benchmark's fixed run id) in one folder: both archives survive."""
    root = tmp_path / "checkpoints"
    for attempt in range(2):
        write_run_record(root, RunRecord("same", "lay", "fp", "fedavg", finished=True))
        _save(root, attempt)
        archive_previous(root)
    assert (tmp_path / "checkpoints.same" / "round-0000").is_dir()
    assert (tmp_path / "checkpoints.same.1" / "round-0001").is_dir()


def test_retention_keeps_the_newest_n_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for v in range(7):
        save_checkpoint(root, v, {"u": np.zeros(4, np.float32)}, {}, {"version": v}, keep_newest=2, best=1)
    assert sorted(p.name for p in root.glob("round-*")) == ["round-0001", "round-0005", "round-0006"]
    save_checkpoint(root, 7, {"u": np.zeros(4, np.float32)}, {}, {"version": 7}, keep_newest=1, best=None)
    assert sorted(p.name for p in root.glob("round-*")) == ["round-0007"]


def test_a_run_keeps_the_configured_checkpoints_and_its_best_model(tmp_path):
    """aggregator.keep_checkpoints through a real (in-process) run: the newest N survive, and the
    version whose global model the silos measured lowest, wherever it lies."""
    data = smoke_config(tmp_path, rounds=4, min_silos=3).model_dump(mode="json")
    data["aggregator"]["keep_checkpoints"] = 1
    config = parse_config(data)
    ensure_pki(config.aggregator.pki_dir, ["silo0", "silo1", "silo2"])
    done = run_in_process(config, [silo_config(config, f"silo{i}", 0, i, 3) for i in range(3)])
    assert done.machine.succeeded
    losses = {r["round"]: r["global_loss"] for r in done.metrics.rows() if r["global_loss"] is not None}
    # the best among the versions measured when round 4 was saved (version 4 is measured after it)
    best = min((v for v in losses if v < 4), key=losses.__getitem__)
    kept = sorted(int(p.name.removeprefix("round-")) for p in (config.run.output_dir / "checkpoints").glob("round-*"))
    assert kept == sorted({best, 4}), (kept, losses)
