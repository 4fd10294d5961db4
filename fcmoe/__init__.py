"""FC-MoE: conflict-aware federated fine-tuning of Mixture-of-Experts LLMs across silos.

Shared, role-neutral pieces live here (config schema, model building and the expert layout,
structured logging, the command line). The two roles, ``silo_agent`` and ``aggregator``,
import this package, ``crypto`` and ``protos``, never each other.
"""

__version__ = "0.1.0"
