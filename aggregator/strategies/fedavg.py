"""FedAvg (McMahan et al. 2017): the sample-weighted mean of silo deltas, applied with a server lr."""

from __future__ import annotations

from aggregator.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
