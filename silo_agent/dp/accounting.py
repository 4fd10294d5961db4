"""The running epsilon of one silo's training data: Opacus' accountants, history rebuilt from the ledger.

The accountant is the mechanism's bookkeeping, apart from the mechanism (DP-SGD, silo_agent/dp/
training.py): each release adds ``(noise_multiplier, sample_rate, steps)`` to its history. A silo
builds the history from its ledger when it starts, so a restart resumes its epsilon instead of
starting again from zero (a fresh accountant per round or per process under-reports).
"""

from __future__ import annotations

from collections.abc import Iterable

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
# Integer Renyi orders: Opacus and Google's dp-accounting compute the subsampled Gaussian's RDP
# exactly at integer orders (their fractional-order series differ by ~1e-4 relative), so an auditor
# reproduces the silo's epsilon to ~1e-12. Costs ~2.5 % looser epsilon than Opacus' default grid.
RDP_ORDERS = (2, 256)  # inclusive range, recorded in every ledger entry
PRV_EPS_ERROR = 0.01


def _accountant(kind: str, history: Iterable[Release]) -> RDPAccountant | PRVAccountant:
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def epsilon(kind: str, history: Iterable[Release], delta: float) -> float:
    """Epsilon at ``delta`` after every release in ``history`` (0 for none)."""
    history = list(history)
    if not history:
        return 0.0
    accountant = _accountant(kind, history)
    if kind == "rdp":
        return float(accountant.get_epsilon(delta, alphas=_rdp_orders()))
    return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def _rdp_orders() -> list[int]:
    return list(range(RDP_ORDERS[0], RDP_ORDERS[1] + 1))


class PrivacyBudget:
    """What has been spent, what a round would spend, and whether that stays within the budget."""

    def __init__(self, kind: str, delta: float, budget: float, history: Iterable[Release] = ()):
        self.kind, self.delta, self.budget = kind, delta, budget
        self.history: list[Release] = list(history)

    @property
    def spent(self) -> float:
        return epsilon(self.kind, self.history, self.delta)

    def after(self, release: Release) -> float:
        return epsilon(self.kind, [*self.history, release], self.delta)

    def record(self, release: Release) -> float:
        self.history.append(release)
        return self.spent


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """The smallest noise multiplier with which ``steps`` steps spend at most ``target_epsilon``,
    counted exactly as the running epsilon is (same orders), so the run fits its target."""
    options = {"alphas": _rdp_orders()} if kind == "rdp" else {"eps_error": PRV_EPS_ERROR}
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=kind, **options))
