"""silo_agent/round_mode.py: a silo answers every mode's tasks through one interface; mode none sends
``coefficient * delta`` and its weighted sketches; a phase the attempt's mode has not is refused in one line."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from crypto.secagg import SecAggError
from fcmoe.errors import ConfigError
from fcmoe.config import SecureAggregationConfig
from protos import fcmoe_pb2 as pb
from silo_agent.agent import ROUND_MODES
from silo_agent.ckks_round import CkksSession
from silo_agent.masked_round import MaskingSession
from silo_agent.round_mode import PlainRound, RunKeys


def test_every_configurable_mode_has_a_silo_side_and_says_its_name():
    modes = typing.get_args(SecureAggregationConfig.model_fields["mode"].annotation)
    assert set(ROUND_MODES) == set(modes)
    assert all(cls.mode == name for name, cls in ROUND_MODES.items())


def test_mode_none_sends_the_weighted_delta_and_the_weighted_sketches():
    mode = PlainRound(session=7)
    assert mode.advert() is None and mode.kept(RunKeys(b"s")) == RunKeys(b"s")
    instructions = pb.UploadInstructions(units=["u", "v"], coefficients=[0.5, 2.0])
    deltas = {"u": np.array([1.0, -2.0], np.float32), "v": np.array([3.0], np.float32)}
    payload = mode.update_payload(instructions, deltas)
    np.testing.assert_array_equal(payload["u"], [0.5, -1.0])
    np.testing.assert_array_equal(payload["v"], [6.0])
    with pytest.raises(ConfigError, match="set silo.sketch_key"):  # plaintext sketches: the configured key only
        mode.open_sketch_stage(instructions)
    assert PlainRound(session=7, sketch_key=b"k" * 32).open_sketch_stage(instructions) == b"k" * 32
    weighted = {"u": np.array([0.25, 1.5], np.float64)}
    sent = mode.sketch_payload({"u": np.ones(2, np.float32)}, weighted)
    assert sent["u"].dtype == np.float32 and sent["u"].tolist() == [0.25, 1.5]


@pytest.mark.parametrize("make, refused", [
    (lambda pki: PlainRound(1), ["share phase", "consistency check", "unmask", "decryption"]),
    (lambda pki: MaskingSession("run", 1, "silo0", pki.directory, 2), ["decryption"]),
    (lambda pki: CkksSession("run", 1, "silo0", pki.directory, 2), ["sketch stage", "consistency check", "unmask"]),
])
def test_a_phase_the_mode_has_not_is_refused_in_one_line(pki, make, refused):
    mode = make(pki)
    calls = {"share phase": lambda: mode.make_shares(pb.ShareInstructions()),
             "sketch stage": lambda: mode.open_sketch_stage(pb.UploadInstructions(stage="sketch")),
             "consistency check": lambda: mode.sign_view(pb.CheckInstructions()),
             "unmask": lambda: mode.reveal(pb.UnmaskInstructions()),
             "decryption": lambda: mode.sum_specs(pb.DecryptInstructions())}
    for what in refused:
        with pytest.raises(SecAggError, match=f"^no {what} in mode {mode.mode}$"):
            calls[what]()
