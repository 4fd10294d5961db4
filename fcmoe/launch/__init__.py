"""The launch shell: commands, the local simulation and the in-process runner, which put the roles together.

The only place that imports both roles; nothing below it imports it (tests/unit/test_layers.py).
"""
