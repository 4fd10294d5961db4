"""silo_agent/memory.py: this process's memory now and at its peak, and a peak started afresh."""

from __future__ import annotations

import sys

import pytest
import torch

from silo_agent.memory import memory_bytes, peak_memory_bytes, release_host_memory, reset_peak_memory

CPU = torch.device("cpu")
BLOCK = 64 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident set's figures are Linux's")
def test_a_freed_block_stays_in_the_peak_until_the_peak_is_started_afresh():
    before = memory_bytes(CPU)
    block = torch.ones(BLOCK // 4)  # written, so resident
    assert memory_bytes(CPU) >= before + BLOCK * 0.9
    high = peak_memory_bytes(CPU)
    assert high >= before + BLOCK * 0.9
    del block
    release_host_memory()
    assert memory_bytes(CPU) < high - BLOCK * 0.5  # handed back to the system
    assert peak_memory_bytes(CPU) >= high - BLOCK * 0.1  # the high-water mark remembers it
    reset_peak_memory(CPU)
    assert peak_memory_bytes(CPU) < high - BLOCK * 0.5  # from now on: the block is not in the new peak
