"""The rank layout, pure: groups partition the world, EP/TP stay inside nodes when they can, refusals explain.

Also checks that `launcher.topology` (what the driver reports and verifies) agrees rank for rank with
`moe.parallel.mesh` (what the workers build their process groups from), and with the DeviceMesh
definition itself (world ranks reshaped to (pp, dp, tp) and (pp, edp, ep)).
"""
from __future__ import annotations

import os
import random
import uuid

import numpy as np
import pytest

from launcher.preflight import NodeSlots, ResourceError, choose_nodes
from launcher.topology import (
    GROUP_KINDS, Layout, TopologyError, WorkerInfo, assign_ranks, assumed_placements, build_placements,
    layout_problems, node_devices,
)
from moe.parallel.mesh import ParallelContext


def factorizations(world: int):
    """Every (dp, tp, pp, ep) with dp*tp*pp = world and ep dividing dp*tp."""
    for pp in range(1, world + 1):
        if world % pp:
            continue
        for tp in range(1, world // pp + 1):
            if (world // pp) % tp:
                continue
            dp = world // pp // tp
            for ep in range(1, dp * tp + 1):
                if (dp * tp) % ep == 0:
                    yield Layout(dp, tp, pp, ep)


def shapes():
    """1 to 16 nodes, 1 to 8 workers per node, at most 128 ranks."""
    return [(n, w) for n in range(1, 17) for w in range(1, 9) if n * w <= 128]


def mesh_groups(layout: Layout, kind: str) -> set[tuple[int, ...]]:
    """Groups as torch's DeviceMesh slices them: the dimension `kind` of the reshaped world."""
    ranks = np.arange(layout.world)
    if kind in ("pp", "dp", "tp"):
        mesh, axis = ranks.reshape(layout.pp, layout.dp, layout.tp), ("pp", "dp", "tp").index(kind)
    else:
        mesh, axis = ranks.reshape(layout.pp, layout.edp, layout.ep), ("pp", "edp", "ep").index(kind)
    moved = np.moveaxis(mesh, axis, -1).reshape(-1, mesh.shape[axis])
    return {tuple(int(r) for r in g) for g in moved}


def simulated_workers(nodes: int, per_node: int, rng: random.Random, use_gpu: bool = True) -> list[WorkerInfo]:
    """Workers as Ray would report them: random node ids, one shared IP (simulated nodes), shuffled."""
    ids = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(nodes)]
    out = [WorkerInfo(ids[n], "10.0.0.1", [str(g)] if use_gpu else [], 0)
           for n in range(nodes) for g in range(per_node)]
    rng.shuffle(out)
    for i, w in enumerate(out):
        w.handle_index = i
    return out


def test_groups_partition_and_match_mesh_for_every_shape():
    rng = random.Random(0)
    checked = 0
    for nodes, per_node in shapes():
        world = nodes * per_node
        for layout in factorizations(world):
            for kind in GROUP_KINDS:
                groups = layout.groups(kind)
                flat = sorted(r for g in groups for r in g)
                assert flat == list(range(world)), f"{layout} {kind}: not a partition"
                size = {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "edp": layout.edp}[kind]
                assert all(len(g) == size for g in groups)
                assert {tuple(g) for g in groups} == mesh_groups(layout, kind), f"{layout} {kind} vs DeviceMesh"
            # What the workers use must be what the driver reports.
            r = rng.randrange(world)
            ctx = ParallelContext(rank=r, world_size=world, dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep)
            for kind in GROUP_KINDS:
                assert layout.group_ranks(r, kind) == ctx.group_ranks(kind), f"{layout} rank {r} {kind}"
            checked += 1
    assert checked > 1000


def test_ep_and_tp_inside_nodes_whenever_possible_else_refused():
    rng = random.Random(1)
    for nodes, per_node in shapes():
        world = nodes * per_node
        for layout in factorizations(world):
            problems = layout_problems(layout, per_node, allow_cross_node_ep=False)
            ep_fits = per_node % layout.ep == 0
            tp_fits = per_node % layout.tp == 0
            assert (not problems) == (ep_fits and tp_fits), (layout, per_node, problems)
            if not ep_fits:
                assert any("parallel.ep" in p and "allow_cross_node_ep=true" in p for p in problems)
                assert bool(layout_problems(layout, per_node, allow_cross_node_ep=True)) == (not tp_fits)
            if problems:
                continue
            workers = simulated_workers(nodes, per_node, rng)
            placements = build_placements(layout, assign_ranks(workers), per_node, False)
            node_of_rank = [p.node_index for p in placements]
            assert node_of_rank == [r // per_node for r in range(world)]
            for kind in ("ep", "tp"):
                for g in layout.groups(kind):
                    assert len({node_of_rank[r] for r in g}) == 1, f"{layout} {kind} group {g} crosses nodes"


def test_ranks_follow_node_then_gpu_order_not_report_order():
    rng = random.Random(2)
    workers = simulated_workers(4, 8, rng)
    ranked = assign_ranks(workers)
    placements = build_placements(Layout(dp=32, ep=8), ranked, 8, False)
    for node in range(4):
        mine = [p for p in placements if p.node_index == node]
        assert [p.rank for p in mine] == list(range(8 * node, 8 * node + 8))
        assert [p.gpu_id for p in mine] == [str(g) for g in range(8)]
        assert len({p.node_id for p in mine}) == 1
    assert all(p.node_ip == "10.0.0.1" for p in placements)  # one IP for all: grouping used node ids


def test_workers_see_their_node_mates_gpus_and_pick_their_own():
    # Ray handed out GPUs 5 and 2 on node a, 0 and 7 on node b, reported in scrambled order.
    workers = [WorkerInfo("b", "2", ["7"], 0), WorkerInfo("a", "1", ["5"], 1),
               WorkerInfo("b", "2", ["0"], 2), WorkerInfo("a", "1", ["2"], 3)]
    ranked = assign_ranks(workers)
    assert [(w.node_id, w.gpu_ids[0]) for w in ranked] == [("a", "2"), ("a", "5"), ("b", "0"), ("b", "7")]
    devices = node_devices(ranked)
    assert devices == [("2,5", 0), ("2,5", 1), ("0,7", 0), ("0,7", 1)]
    for w, (visible, index) in zip(ranked, devices):
        assert visible.split(",")[index] == w.gpu_ids[0]  # each rank still drives the GPU Ray gave it
    assert node_devices([WorkerInfo("a", "1", [], 0), WorkerInfo("a", "1", [], 1)]) == [("", 0), ("", 0)]


def test_worker_process_takes_the_visible_devices_before_cuda_starts(monkeypatch):
    """TrainWorker.run widens CUDA_VISIBLE_DEVICES to the node's GPUs and trains on its own index."""
    import moe.train.worker as worker_mod
    from launcher.placement import TrainWorker

    seen = {}

    def fake_run_worker(job, rank, world, addr, port, node_of_rank, report, local_device=0):
        seen.update(visible=os.environ.get("CUDA_VISIBLE_DEVICES"), local=os.environ.get("LOCAL_RANK"),
                    local_device=local_device)
        return {}

    import torch

    monkeypatch.setattr(worker_mod, "run_worker", fake_run_worker)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # what Ray set for this actor
    monkeypatch.setenv("LOCAL_RANK", "0")  # so that monkeypatch restores the variable afterwards
    threads = torch.get_num_threads()
    try:
        TrainWorker().run(None, 1, 2, "127.0.0.1", 0, [0, 0], None, threads, devices=("2,5", 1))
        assert seen == {"visible": "2,5", "local": "1", "local_device": 1}
        seen.clear()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU workers: nothing is touched
        TrainWorker().run(None, 0, 1, "127.0.0.1", 0, [0], None, threads)
        assert seen["visible"] == "" and seen["local_device"] == 0
    finally:
        torch.set_num_threads(threads)


def test_preferred_node_order_is_kept():
    workers = [WorkerInfo("b", "1", ["0"], 0), WorkerInfo("a", "1", ["0"], 1)]
    assert [w.node_id for w in assign_ranks(workers, ["b", "a"])] == ["b", "a"]
    assert [w.node_id for w in assign_ranks(workers)] == ["a", "b"]


def test_verification_catches_interleaved_and_uneven_reports():
    interleaved = [WorkerInfo(n, "1", [], i) for i, n in enumerate("abab")]
    with pytest.raises(TopologyError, match="not node-contiguous"):
        build_placements(Layout(dp=4, ep=2), interleaved, 2, False)
    uneven = [WorkerInfo(n, "1", [], i) for i, n in enumerate("aaab")]
    with pytest.raises(TopologyError, match="same number of workers"):
        build_placements(Layout(dp=4, ep=2), uneven, 2, False)
    # Node-contiguous but the EP group straddles nodes: caught from the reports, allowed when asked to be.
    straddle = [WorkerInfo(n, "1", [], i) for i, n in enumerate("aabbcc")]
    with pytest.raises(TopologyError, match="EP group"):
        build_placements(Layout(dp=6, ep=3), straddle, 2, False)
    assert len(build_placements(Layout(dp=6, ep=3), straddle, 2, True)) == 6


def test_uneven_world_is_refused_with_fix():
    problems = layout_problems(Layout(dp=6, ep=2), 4, False)
    assert problems and "same number of workers" in problems[0] and "cluster.workers_per_node" in problems[0]


def test_assumed_placements_for_plan_mode_number_nodes_numerically():
    placements = assumed_placements(Layout(dp=96, ep=8), 8, use_gpu=True)
    assert placements[95].node_id == "node-11" and placements[95].node_index == 11
    assert placements[95].gpu_id == "7"


# ---- preflight: choosing nodes (pure; the Ray tests cover reading a real cluster) ----------------------

def node(i: int, slots: int, gpus: float = 0) -> NodeSlots:
    return NodeSlots(f"{i:02d}" + "f" * 54, "127.0.0.1", float(slots), gpus, slots)


def test_preflight_fills_nodes_evenly():
    plan = choose_nodes([node(0, 2), node(1, 2)], 4, 0, False, 1, Layout(dp=4, ep=2), False)
    assert plan.workers_per_node == 2 and len(plan.nodes) == 2


def test_preflight_refuses_more_workers_than_slots_naming_both():
    with pytest.raises(ResourceError) as e:
        choose_nodes([node(0, 2), node(1, 2)], 8, 0, False, 1, Layout(dp=8, ep=2), False)
    msg = str(e.value)
    assert "cluster.num_workers=8" in msg and "2 node(s), 4 worker slots" in msg and "add nodes" in msg


def test_preflight_prefers_a_node_size_that_keeps_ep_local():
    nodes = [node(i, 3) for i in range(3)]
    plan = choose_nodes(nodes, 6, 0, False, 1, Layout(dp=6, ep=2), False)
    assert plan.workers_per_node == 2 and len(plan.nodes) == 3


def test_preflight_refuses_cross_node_ep_unless_allowed():
    nodes = [node(0, 2), node(1, 2)]
    with pytest.raises(TopologyError, match="allow_cross_node_ep"):
        choose_nodes(nodes, 4, 0, False, 1, Layout(dp=4, ep=4), False)
    assert choose_nodes(nodes, 4, 0, False, 1, Layout(dp=4, ep=4), True).workers_per_node == 2


def test_preflight_skips_gpu_less_head_and_honours_workers_per_node():
    head = NodeSlots("head", "10.0.0.1", 8, 0, 0)
    gpu_nodes = [NodeSlots(f"n{i}", f"10.0.0.{i + 2}", 96, 8, 8) for i in range(2)]
    plan = choose_nodes([head, *gpu_nodes], 16, 8, True, 4, Layout(dp=16, ep=8), False)
    assert [n.node_id for n in plan.nodes] == ["n0", "n1"]
    with pytest.raises(ResourceError, match="4 per node"):
        choose_nodes([head, *gpu_nodes], 16, 4, True, 4, Layout(dp=16, ep=4), False)
