"""Thread plan: a pure function of measured costs and cores; the embedder applies it and re-plans."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from imat.engine.thread_plan import (
    OVERSUBSCRIBE,
    CostMeter,
    Gate,
    all_cores_bound,
    plan_threads,
)


def _best_possible(decode_s, model_s, cores, max_lanes):
    """Brute force: the best min(decoders/decode, lanes/model, bound) over every allowed split."""
    bound = all_cores_bound(decode_s, model_s, cores)
    return max(min(d / decode_s, m / model_s, bound)
               for m in range(1, max_lanes + 1) for d in range(1, cores + OVERSUBSCRIBE - m + 1))


def test_decode_bound_photos_give_the_decoders_the_cores():
    # iMaterialist-size photos on 2 cores: 12.6 ms to decode, 2 ms for MobileNetV2 (the figures)
    plan = plan_threads(12.6e-3, 2e-3, 2)
    assert (plan.decode_threads, plan.model_threads) == (2, 1)
    assert plan.items_per_s == pytest.approx(2 / 14.6e-3)  # the all-cores bound, not 1/12.6 ms
    assert "decode-bound" in plan.reason


def test_model_bound_resnet_gives_the_model_the_cores():
    plan = plan_threads(2.3e-3, 15e-3, 2)  # ResNet50 on ccp-dev
    assert (plan.decode_threads, plan.model_threads) == (1, 2)
    assert plan.items_per_s == pytest.approx(plan.bound_items_per_s)
    assert "model-bound" in plan.reason


def test_balanced_costs_take_the_fewest_threads():
    plan = plan_threads(1e-3, 1e-3, 2)
    assert (plan.decode_threads, plan.model_threads) == (1, 1)
    one_core = plan_threads(5e-3, 1e-3, 1)
    assert (one_core.decode_threads, one_core.model_threads) == (1, 1)


def test_gpu_session_gets_one_lane_and_the_rest_decodes():
    plan = plan_threads(12e-3, 1e-3, 16, max_model_threads=1)
    assert plan.model_threads == 1 and plan.decode_threads == 12  # 12 / 12 ms = 1 / 1 ms: balanced


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
def test_plan_is_the_best_split_for_any_costs(cores):
    rng = np.random.default_rng(cores)
    for decode_s, model_s in itertools.islice(zip(rng.uniform(1e-4, 3e-2, 200), rng.uniform(1e-4, 3e-2, 200)), 200):
        plan = plan_threads(decode_s, model_s, cores)
        assert 1 <= plan.model_threads <= cores and plan.decode_threads >= 1
        assert plan.decode_threads + plan.model_threads <= cores + OVERSUBSCRIBE
        assert plan.items_per_s == pytest.approx(_best_possible(decode_s, model_s, cores, cores))
        assert plan.items_per_s <= plan.bound_items_per_s * (1 + 1e-9)


def test_plan_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="cores"):
        plan_threads(1e-3, 1e-3, 0)
    with pytest.raises(ValueError, match="costs"):
        plan_threads(-1e-3, 1e-3, 2)


def test_cost_meter_windows():
    meter = CostMeter()
    meter.add("decode", 0.02)
    meter.add("decode", 0.04)
    meter.add("model", 0.5, items=50)
    assert meter.counts() == (2, 50)
    assert meter.take() == pytest.approx((0.03, 0.01))
    assert meter.counts() == (0, 0)


def test_gate_limit_changes_while_threads_wait():
    gate = Gate(1)
    entered, release = threading.Semaphore(0), threading.Event()

    def worker():
        with gate:
            entered.release()
            release.wait(5)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    assert entered.acquire(timeout=5)
    assert not entered.acquire(timeout=0.2)  # the limit holds the other two back
    gate.set_limit(3)
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5)
    release.set()
    for t in threads:
        t.join(5)


def test_adaptive_embedding_plans_and_matches_fixed_threads(tiny_model, photo_dir):
    from imat.engine import Engine
    from imat.engine.embedder import embed_items

    paths = sorted(photo_dir.glob("*.jpg")) * 4  # 48 items, 12 batches of 4: planned, then re-planned
    engine = Engine(tiny_model, batch_size=4, progress=False)
    assert engine.session.intra_op_threads == 1  # lanes, not intra-op threads, carry the model's share
    adaptive = embed_items(engine.session, paths, batch_size=4, progress=False, cores=2)
    fixed = embed_items(engine.session, paths, batch_size=4, decode_threads=1, progress=False)
    np.testing.assert_allclose(adaptive.embeddings, fixed.embeddings, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(adaptive.ok_indices, np.arange(len(paths)))
    t = adaptive.timings
    assert t.plans and "lane" in t.plans[0]
    assert t.decode_threads >= 1 and 1 <= t.model_threads <= 2 and t.decode_threads + t.model_threads <= 3
    assert fixed.timings.plans == [] and (fixed.timings.decode_threads, fixed.timings.model_threads) == (1, 1)


def test_explicit_threads_win(tiny_model):
    from imat.engine import Engine

    engine = Engine(tiny_model, decode_threads=1, intra_op_threads=2, progress=False)
    assert engine.session.intra_op_threads == 2 and engine.decode_threads == 1
    engine.embed([np.zeros((32, 32, 3), np.uint8)] * 10)
    t = engine.last_result.timings
    assert (t.decode_threads, t.model_threads) == (1, 1) and t.plans == []
