"""FC-MoE: conflict-aware federated fine-tuning of Mixture-of-Experts LLMs across silos.

The ground every other package stands on (errors, config schema, model building and the expert
layout, structured logs, file I/O): it imports nothing else of the project. ``crypto`` and
``protos`` import it; the two roles, ``silo_agent`` and ``aggregator``, import those and never each
other; ``fcmoe.launch`` (the commands) puts them together. tests/unit/test_layers.py holds everyone to it.
"""

__version__ = "0.1.0"
