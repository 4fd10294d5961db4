"""Server optimizers on the averaged update (FedOpt, Reddi et al. 2021). Pure functions on arrays.

The averaged client delta ``d`` acts as a negative pseudo-gradient: plain FedAvg applies
``x + lr * d``; FedAvgM keeps a momentum buffer; FedAdam keeps Adam moments with adaptivity ``tau``.
"""

from __future__ import annotations

import numpy as np


def sgd_step(x: np.ndarray, delta: np.ndarray, lr: float) -> np.ndarray:
    return (x + lr * delta).astype(np.float32)


def momentum_step(
    x: np.ndarray, delta: np.ndarray, momentum_buf: np.ndarray | None, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """FedAvgM (Hsu et al. 2019): v <- beta v + d; x <- x + lr v."""
    v = delta if momentum_buf is None else momentum * momentum_buf + delta
    return (x + lr * v).astype(np.float32), v.astype(np.float32)


def adam_step(
    x: np.ndarray,
    delta: np.ndarray,
    m: np.ndarray | None,
    v: np.ndarray | None,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedAdam as in Reddi et al. (Algorithm 2): no bias correction; tau bounds the adaptivity."""
    m = (1 - beta1) * delta if m is None else beta1 * m + (1 - beta1) * delta
    v0 = np.full_like(delta, tau * tau) if v is None else v
    v = beta2 * v0 + (1 - beta2) * delta * delta
    x_new = x + lr * m / (np.sqrt(v) + tau)
    return x_new.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
