"""FedOpt server optimizers (Reddi et al. 2021): FedAvgM and FedAdam on the averaged delta."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.server_optim import adam_step, momentum_step
from aggregator.strategies.base import Strategy
from fcmoe.config import FedAdamConfig, FedAvgMConfig


class _StatefulStrategy(Strategy):
    """Keeps named per-unit buffers (``slot/unit``) for checkpointing."""

    slots: tuple[str, ...] = ()

    def __init__(self, server_lr: float) -> None:
        super().__init__(server_lr)
        self._buffers: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.slots}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"{slot}/{unit}": arr for slot, bufs in self._buffers.items() for unit, arr in bufs.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._buffers = {s: {} for s in self.slots}
        for key, arr in arrays.items():
            slot, _, unit = key.partition("/")
            if slot not in self._buffers:
                raise ValueError(f"strategy {self.name}: unknown state slot {slot!r}")
            self._buffers[slot][unit] = np.asarray(arr, dtype=np.float32)


class FedAvgM(_StatefulStrategy):
    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__(server_lr)
        self.momentum = momentum

    @classmethod
    def from_config(cls, config: FedAvgMConfig, min_group_size: int) -> "FedAvgM":
        return cls(config.server_lr, config.momentum)

    def apply(self, unit: str, x: np.ndarray, update: np.ndarray) -> np.ndarray:
        buf = self._buffers["momentum"]
        out, buf[unit] = momentum_step(x, update, buf.get(unit), self.server_lr, self.momentum)
        return out


class FedAdam(_StatefulStrategy):
    name = "fedadam"
    slots = ("m", "v")

    def __init__(self, server_lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    @classmethod
    def from_config(cls, config: FedAdamConfig, min_group_size: int) -> "FedAdam":
        return cls(config.server_lr, config.beta1, config.beta2, config.tau)

    def apply(self, unit: str, x: np.ndarray, update: np.ndarray) -> np.ndarray:
        m, v = self._buffers["m"], self._buffers["v"]
        out, m[unit], v[unit] = adam_step(x, update, m.get(unit), v.get(unit), self.server_lr,
                                          self.beta1, self.beta2, self.tau)
        return out
