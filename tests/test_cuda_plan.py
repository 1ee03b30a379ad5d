"""The CUDA multi-tensor launch planner (csrc/multi_tensor/launch_plan.h), run on the CPU.

The planner is plain host code compiled into every build of frozenopt._C and
exposed as ``frozenopt._C.cuda_plan``; the CUDA ops call the very same
template. Sizes only: nothing is allocated, so tensors of 2^31 elements and
more are checked as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frozenopt import ops

plan_mod = ops.require_extension().cuda_plan
CHUNK = plan_mod.chunk_size
DEPTHS = (2, 3, 5, 6)  # sgd, sgd+momentum, adam, adam+amsgrad
BUDGETS = {"small": 4096, "large": 32764}


def fake_address(tensor_id: int, row: int) -> int:
    return ((tensor_id + 1) << 20) | (row << 12)


def check_plan(depth, numels, launches, max_tensors, max_blocks):
    """Every non-empty tensor's chunks appear exactly once, in order, with valid metadata."""
    seen = []  # (tensor_id, chunk) in launch order
    for launch in launches:
        slots, blocks = launch["slots"], launch["blocks"]
        assert 0 < len(blocks) <= max_blocks
        assert 0 < len(slots) <= max_tensors
        used = set()
        for slot, chunk in blocks:
            assert 0 <= slot < len(slots)
            tensor_id, numel, addresses = slots[slot]
            assert numel == numels[tensor_id] > 0
            assert addresses == [fake_address(tensor_id, r) for r in range(depth)]
            assert 0 <= chunk and chunk * CHUNK < numel
            seen.append((tensor_id, chunk))
            used.add(slot)
        assert used == set(range(len(slots))), "a slot without blocks wastes metadata"
        ids = [s[0] for s in slots]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    expected = [(i, c) for i, n in enumerate(numels) for c in range(-(-n // CHUNK))]
    assert seen == expected


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_limits_fit_the_kernel_argument_budget(depth, budget):
    max_tensors, max_blocks, max_steps = plan_mod.limits(depth, budget)
    assert max_tensors >= 30 and max_blocks >= 192 and max_steps >= 300
    launch = plan_mod.plan(depth, [CHUNK * 2] * 3, budget)[0]
    # The metadata struct plus the reserved room for the other arguments fit.
    assert launch["meta_bytes"] + 256 <= BUDGETS[budget]
    if budget == "large":
        assert max_tensors >= 300 and max_blocks >= 2048 and max_steps >= 2700


def test_budget_sizes():
    assert plan_mod.budget_bytes == BUDGETS


@pytest.mark.parametrize("driver,major,large", [
    (13000, 9, True), (12010, 7, True), (12080, 8, True),
    (12000, 9, False),  # a CUDA 12.1+ runtime on a 12.0 driver (minor-version compatibility)
    (11080, 8, False), (12010, 6, False), (0, 9, False),  # 0: no driver version could be read
])
def test_budget_is_chosen_at_run_time_from_driver_and_device(driver, major, large):
    expected = "large" if large and plan_mod.large_args_built else "small"
    assert plan_mod.budget_for(driver, major) == expected


def test_both_budgets_plan_the_same_work():
    """What a launch carries differs with the budget, not what gets done."""
    numels = [0, 300] * 200 + [3 * CHUNK + 1] * 50
    for depth in DEPTHS:
        plans = {b: plan_mod.plan(depth, numels, b) for b in BUDGETS}
        for budget, launches in plans.items():
            check_plan(depth, numels, launches, *plan_mod.limits(depth, budget)[:2])
            assert all(launch["meta_bytes"] + 256 <= BUDGETS[budget] for launch in launches)
        assert len(plans["small"]) > len(plans["large"])


@pytest.mark.parametrize("depth", DEPTHS)
def test_one_launch_for_a_small_model(depth):
    numels = [10, 0, 4096, 1, 65536, 65537, 3]
    launches = plan_mod.plan(depth, numels)
    assert len(launches) == 1
    check_plan(depth, numels, launches, *plan_mod.limits(depth)[:2])
    assert plan_mod.count_launches(depth, numels) == 1


def test_empty_tensors_take_no_slot_and_do_not_drop_the_pending_launch():
    # Empty tensors at the start, between, and at the very end (where a launcher
    # that only flushes inside its loop silently drops the last launch).
    numels = [0, 5, 0, 0, 7, 0]
    launches = plan_mod.plan(5, numels)
    assert [[s[0] for s in launch["slots"]] for launch in launches] == [[1, 4]]
    check_plan(5, numels, launches, 100, 100)
    # The same with the limits hit exactly just before the trailing empties.
    numels = [3, 3, 0, 0]
    launches = plan_mod.plan(5, numels, max_tensors=2)
    assert len(launches) == 1
    check_plan(5, numels, launches, 2, 100)
    assert plan_mod.plan(5, [0, 0, 0]) == []
    assert plan_mod.plan(5, []) == []


def test_slot_position_is_not_list_position():
    # The mask and the step counters are indexed by tensor id: after empty
    # tensors and across launches, slot i is not tensor i.
    numels = [0, 0, 9, 0, 9, 9, 9]
    launches = plan_mod.plan(2, numels, max_tensors=2)
    assert [[s[0] for s in launch["slots"]] for launch in launches] == [[2, 4], [5, 6]]


def test_tensor_limit_starts_a_new_launch():
    numels = [1] * 10
    launches = plan_mod.plan(3, numels, max_tensors=4)
    assert [len(launch["slots"]) for launch in launches] == [4, 4, 2]
    check_plan(3, numels, launches, 4, 100)


def test_a_tensor_longer_than_a_launch_carries_its_slot_over():
    numels = [5, CHUNK * 7 + 1, 5]
    launches = plan_mod.plan(5, numels, max_blocks=3)
    check_plan(5, numels, launches, 100, 3)
    assert [len(launch["blocks"]) for launch in launches] == [3, 3, 3, 1]
    # The long tensor goes on as slot 0 of the next launch.
    assert launches[1]["slots"][0][0] == 1 and launches[1]["blocks"][0] == (0, 2)
    assert launches[2]["blocks"] == [(0, 5), (0, 6), (0, 7)]
    assert [s[0] for s in launches[3]["slots"]] == [2]


def test_full_tensor_limit_mid_tensor_waits_for_its_last_chunk():
    # The slot table fills on a tensor that still has chunks: the launch goes
    # when the blocks run out or the tensor ends, never with a slot too many.
    numels = [1, CHUNK * 3, 1]
    launches = plan_mod.plan(2, numels, max_tensors=2, max_blocks=100)
    assert [[s[0] for s in launch["slots"]] for launch in launches] == [[0, 1], [2]]
    check_plan(2, numels, launches, 2, 100)


@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 1, 2**33 + 12345])
def test_tensors_of_2_31_elements_and_more(numel):
    # Sizes only: element counts and chunk indices keep their 64 bits (the
    # kernel turns chunk * 65536 into a 64-bit offset; see test_cuda_kernels_cpu).
    numels = [3, numel, 4]
    launches = plan_mod.plan(2, numels, budget="large")
    check_plan(2, numels, launches, *plan_mod.limits(2, "large")[:2])
    slots = [s for launch in launches for s in launch["slots"] if s[0] == 1]
    assert slots and all(s[1] == numel for s in slots)
    last_chunk = max(c for launch in launches for slot, c in launch["blocks"] if launch["slots"][slot][0] == 1)
    assert last_chunk == (numel - 1) // CHUNK


def test_launch_count_of_a_2_40_element_tensor():
    chunks = 2**40 // CHUNK
    max_blocks = plan_mod.limits(5, "large")[1]
    assert plan_mod.count_launches(5, [2**40, 1], "large") == -(-(chunks + 1) // max_blocks)


def test_refuses_more_chunks_than_it_indexes():
    with pytest.raises(Exception, match="more chunks"):
        plan_mod.count_launches(2, [CHUNK * 2**31 + 1])


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_launch_counts_for_a_large_model_are_bounded_below_by_the_limits(budget):
    # 7B-parameter-like: 300 tensors of ~23M elements plus 300 small ones.
    numels = [23_000_000, 4096] * 300
    max_tensors, max_blocks, _ = plan_mod.limits(6, budget)
    chunks = sum(-(-n // CHUNK) for n in numels)
    count = plan_mod.count_launches(6, numels, budget)
    assert count >= max(-(-len(numels) // max_tensors), -(-chunks // max_blocks))
    assert count <= -(-len(numels) // max_tensors) + -(-chunks // max_blocks) + 1


def test_step_launches():
    per = plan_mod.limits(5, "large")[2]
    assert plan_mod.count_step_launches(0, "large") == 0
    assert plan_mod.count_step_launches(1, "large") == 1
    assert plan_mod.count_step_launches(per, "large") == 1
    assert plan_mod.count_step_launches(per + 1, "large") == 2


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.one_of(st.just(0), st.integers(1, 3 * CHUNK + 7), st.sampled_from([1, CHUNK, CHUNK + 1])),
                    max_size=25),
    max_tensors=st.integers(1, 6),
    max_blocks=st.integers(1, 7),
    depth=st.sampled_from(DEPTHS),
)
def test_any_sizes_and_limits(numels, max_tensors, max_blocks, depth):
    launches = plan_mod.plan(depth, numels, max_tensors=max_tensors, max_blocks=max_blocks)
    check_plan(depth, numels, launches, max_tensors, max_blocks)


BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_bytes.py"


@pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ not beside the tests")
def test_bytes_model_meets_the_floor(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("cuda_bytes", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", "bert-base", "--frozen", "0.5", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    floors = {"sgd": 12, "sgd_momentum": 20, "adam": 28, "adamw": 28, "adam_amsgrad": 36}
    for row in report["rows"]:
        if row["dtype"] == "float32":
            assert row["floor_bytes_per_element"] == floors[row["optimizer"]]
        assert row["bytes_per_frozen_element"] == 0
        assert 1.0 <= row["ratio_to_floor"] < 1.001
        assert row["launches_per_step_eager"] <= row["launches_per_step_graph"]
