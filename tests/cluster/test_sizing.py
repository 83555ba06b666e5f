"""The sizing guide's counts: FLOPs against ResNet-50's published cost, and the ring all-reduce's traffic."""

from __future__ import annotations

import pytest

from jobs.sizing import preset_cost, ring_seconds


def test_resnet50_ml_costs_what_resnet50_is_known_to_cost_plus_its_head():
    cost = preset_cost("ResNet50_ML", classes=80)
    # ResNet-50 is 4.1 GMACs at 224 px, so 2 x 4.1 x 4 = 32.8 GFLOPs at 448; the ML-Decoder head adds a little
    assert 32.8 < cost["gflops"] < 37 and cost["size"] == 448
    assert 23.5e6 < cost["params"] < 35e6 and cost["grad_bytes"] == 4 * cost["params"]


def test_ring_all_reduce_sends_twice_the_buffer_less_one_share():
    assert ring_seconds(100_000_000, 2, 100) == pytest.approx(100e6 * 8 / 100e9)  # 2 (N-1)/N = 1
    assert ring_seconds(100_000_000, 64, 400) == pytest.approx(2 * 63 / 64 * 100e6 * 8 / 400e9)
