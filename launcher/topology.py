"""Rank layout, pure: rank -> node -> GPU -> groups, and the checks that keep EP and TP inside a node.

Nothing here touches Ray or torch.distributed; the driver feeds it what the workers reported and
plan mode feeds it an assumed cluster, so both print the same table and refuse the same layouts.

The rank order is the one `moe.parallel.mesh` builds its DeviceMesh with: pp outermost, then dp, tp
innermost; the expert view reads the dp*tp ranks of a stage as (edp, ep) with ep innermost, so an EP
group is `ep` consecutive ranks. Ranks are node-contiguous (node 0 holds ranks 0..w-1, node 1 the
next w, ...), so an EP (or TP) group lies inside one node exactly when its size divides the number
of workers per node, and no other node-contiguous assignment could do better: a node can only hold
whole groups if the group size divides the node's worker count.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

GROUP_KINDS: tuple[str, ...] = ("dp", "tp", "pp", "ep", "edp")


class TopologyError(ValueError):
    """A rank layout that cannot (or may not) run; the message says why and how to fix it."""


@dataclass(frozen=True)
class Layout:
    """Parallel degrees of one job; world = dp * tp * pp, and ep divides dp * tp."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Replicas of each expert shard (expert data parallel)."""
        return self.dp * self.tp // self.ep

    def group_ranks(self, rank: int, kind: str) -> list[int]:
        """World ranks in `rank`'s group of `kind` (dp, tp, pp, ep or edp)."""
        stage_size = self.dp * self.tp
        pp_i, inner = divmod(rank, stage_size)
        base = pp_i * stage_size
        if kind == "tp":
            start = rank - rank % self.tp
            return list(range(start, start + self.tp))
        if kind == "dp":
            return [base + d * self.tp + inner % self.tp for d in range(self.dp)]
        if kind == "pp":
            return [p * stage_size + inner for p in range(self.pp)]
        if kind == "ep":
            start = rank - rank % self.ep
            return list(range(start, start + self.ep))
        if kind == "edp":
            return [base + e * self.ep + inner % self.ep for e in range(self.edp)]
        raise KeyError(f"group kind {kind!r}: must be one of {list(GROUP_KINDS)}")

    def groups(self, kind: str) -> list[list[int]]:
        """Every distinct group of `kind`, each as its sorted member ranks."""
        groups, covered = [], set()
        for r in range(self.world):
            if r not in covered:
                g = self.group_ranks(r, kind)
                covered.update(g)
                groups.append(g)
        return groups


@dataclass
class RankPlacement:
    """Where one world rank runs, as reported by its worker (or assumed by plan mode)."""

    rank: int
    node_index: int
    """Position of the node in rank order (0 holds rank 0)."""
    node_id: str
    """Ray node id (unique per node even when simulated nodes share one IP)."""
    node_ip: str
    gpu_id: str
    """Ray's GPU id for the worker, or `-` for a CPU worker."""
    groups: dict[str, list[int]] = field(default_factory=dict)
    """Members of each of the rank's groups (dp, tp, pp, ep, edp)."""


@dataclass
class WorkerInfo:
    """What a worker reports about itself before it is given a rank."""

    node_id: str
    node_ip: str
    gpu_ids: list[str]
    handle_index: int
    """Index of the worker in the driver's list of actors (ties broken by it)."""


def node_order(workers: list[WorkerInfo], preferred: list[str] | None = None) -> list[str]:
    """Nodes in rank order: `preferred` first (the driver's chosen order), then by (IP, node id)."""
    ips = {w.node_id: w.node_ip for w in workers}
    pref = [n for n in (preferred or []) if n in ips]
    rest = sorted((n for n in ips if n not in pref), key=lambda n: (ips[n], n))
    return pref + rest


def _gpu_key(w: WorkerInfo) -> tuple[int, str, int]:
    g = w.gpu_ids[0] if w.gpu_ids else ""
    return (int(g) if g.isdigit() else -1, g, w.handle_index)


def assign_ranks(workers: list[WorkerInfo], preferred_nodes: list[str] | None = None) -> list[WorkerInfo]:
    """Workers in world-rank order: sorted by node (see `node_order`), then GPU id. Ray's scheduler does
    not promise any order (placement-group bundles are not node-stable), so the order comes from here."""
    order = {n: i for i, n in enumerate(node_order(workers, preferred_nodes))}
    return sorted(workers, key=lambda w: (order[w.node_id], _gpu_key(w)))


def node_devices(ranked: list[WorkerInfo]) -> list[tuple[str, int]]:
    """Per rank: the CUDA_VISIBLE_DEVICES its process should use (every GPU the job holds on its node,
    in rank order) and the index of its own GPU in that list.

    Ray shows each actor only the GPU it assigned. Showing a worker its node mates' GPUs too (as Ray
    Train and torchrun do) lets them map each other's memory: the P2P expert dispatcher needs it, since
    symmetric memory refuses ranks that all name their GPU cuda:0. Workers without GPUs get ("", 0).
    """
    on_node: dict[str, list[str]] = {}
    for w in ranked:
        ids = on_node.setdefault(w.node_id, [])
        ids += [g for g in w.gpu_ids if g not in ids]
    out = []
    for w in ranked:
        ids = on_node[w.node_id]
        out.append((",".join(ids), ids.index(w.gpu_ids[0])) if w.gpu_ids else ("", 0))
    return out


def layout_problems(layout: Layout, workers_per_node: int, allow_cross_node_ep: bool) -> list[str]:
    """Why a node-contiguous layout with `workers_per_node` workers on every node cannot run ([] if it can)."""
    p: list[str] = []
    w, world = workers_per_node, layout.world
    if w < 1:
        return [f"workers per node = {w}: must be >= 1"]
    if world % w:
        return [f"world size {world} (dp*tp*pp = {layout.dp}*{layout.tp}*{layout.pp}) is not a multiple of "
                f"{w} workers per node; every node must host the same number of workers "
                f"(set cluster.workers_per_node to a divisor of {world})"]
    nodes = world // w
    if layout.tp > 1 and w % layout.tp:
        p.append(f"parallel.tp={layout.tp} with {w} workers per node puts tensor-parallel groups across nodes "
                 f"(TP needs NVLink bandwidth); use a tp that divides {w}")
    if layout.ep > 1 and w % layout.ep and not allow_cross_node_ep:
        where = (f"each EP group of {layout.ep} ranks needs {-(-layout.ep // w)} of the {nodes} nodes"
                 if layout.ep > w else
                 f"{layout.ep} does not divide {w}, so some EP groups straddle two nodes")
        p.append(f"parallel.ep={layout.ep} with {w} workers per node puts expert-parallel groups across nodes: "
                 f"{where}, and every MoE layer's all-to-all would cross the network. Use an ep that divides "
                 f"{w} (e.g. parallel.ep={_largest_divisor(w, layout.ep, layout.dp * layout.tp)}), put more "
                 "workers on each node, or set parallel.allow_cross_node_ep=true to accept it")
    return p


def _largest_divisor(w: int, ep: int, stage: int) -> int:
    """Largest ep' <= ep that divides both the node size and the stage (a hint for error messages)."""
    return max(d for d in range(1, min(ep, w) + 1) if w % d == 0 and stage % d == 0)


def check_layout(layout: Layout, workers_per_node: int, allow_cross_node_ep: bool) -> None:
    problems = layout_problems(layout, workers_per_node, allow_cross_node_ep)
    if problems:
        raise TopologyError("refused rank layout:\n" + "\n".join(f"  - {x}" for x in problems))


def build_placements(layout: Layout, ranked: list[WorkerInfo], workers_per_node: int,
                     allow_cross_node_ep: bool, strict: bool = True) -> list[RankPlacement]:
    """Turn workers (already in rank order) into placements and verify, from the nodes they report, that
    ranks are node-contiguous with `workers_per_node` per node and that EP/TP groups stay inside nodes.
    `strict=False` (plan mode) skips the group check so a refused layout can still be shown."""
    if len(ranked) != layout.world:
        raise TopologyError(f"{len(ranked)} workers reported but the layout needs {layout.world}")
    # Node index = order of first appearance in rank order; a non-contiguous assignment shows up below.
    index = {n: i for i, n in enumerate(dict.fromkeys(w.node_id for w in ranked))}
    node_of_rank = [index[w.node_id] for w in ranked]
    counts = {n: node_of_rank.count(i) for n, i in index.items()}
    uneven = {n: c for n, c in counts.items() if c != workers_per_node}
    if uneven:
        raise TopologyError(f"expected {workers_per_node} workers on every node, the workers report "
                            + ", ".join(f"{c} on node {n[:12]}" for n, c in counts.items())
                            + "; every node must host the same number of workers")
    expected = [r // workers_per_node for r in range(layout.world)]
    if node_of_rank != expected:
        raise TopologyError(f"ranks are not node-contiguous: node of each rank is {node_of_rank}, "
                            f"expected {expected}")
    for kind in ("tp", "ep") if strict else ():
        allowed = kind == "ep" and allow_cross_node_ep
        for g in layout.groups(kind):
            spanned = sorted({node_of_rank[r] for r in g})
            if len(spanned) > 1 and not allowed:
                raise TopologyError(f"{kind.upper()} group {g} spans nodes {spanned} (from the workers' reports); "
                                    + "; ".join(layout_problems(layout, workers_per_node, allow_cross_node_ep)))
    return [RankPlacement(rank=r, node_index=node_of_rank[r], node_id=w.node_id, node_ip=w.node_ip,
                          gpu_id=",".join(w.gpu_ids) or "-",
                          groups={k: layout.group_ranks(r, k) for k in GROUP_KINDS})
            for r, w in enumerate(ranked)]


def assumed_placements(layout: Layout, workers_per_node: int, use_gpu: bool) -> list[RankPlacement]:
    """Plan mode: the placements a cluster of identical nodes would give (nodes `node-0`, `node-1`, ...)."""
    workers = [WorkerInfo(node_id=f"node-{r // workers_per_node}", node_ip="?",
                          gpu_ids=[str(r % workers_per_node)] if use_gpu else [], handle_index=r)
               for r in range(layout.world)]
    nodes = list(dict.fromkeys(w.node_id for w in workers))  # node-0, node-1, ... in numeric order
    return build_placements(layout, assign_ranks(workers, nodes), workers_per_node, True, strict=False)


def _span(members: list[int], node_of_rank: list[int]) -> str:
    nodes = sorted({node_of_rank[r] for r in members})
    ranks = f"{members[0]}-{members[-1]}" if len(members) > 2 and members == list(range(members[0], members[-1] + 1)) \
        else ",".join(map(str, members)) if len(members) <= 8 else f"{members[0]},{members[1]},..,{members[-1]}"
    return f"[{ranks}]" + (f"@n{nodes[0]}" if len(nodes) == 1 else f"@{len(nodes)} nodes")


def format_table(placements: list[RankPlacement], max_rows: int = 64) -> str:
    """The rank -> node -> GPU -> groups table (long worlds show the first and last ranks)."""
    node_of_rank = [p.node_index for p in placements]
    head = (f"{'rank':>5} {'node':>4} {'node id':<14} {'ip':<15} {'gpu':>4}  "
            + "  ".join(f"{k:<16}" for k in GROUP_KINDS))
    rows = [head]
    half = max_rows // 2
    shown = placements if len(placements) <= max_rows else placements[:half] + [None] + placements[-half:]
    for p in shown:
        if p is None:
            rows.append(f"{'...':>5}")
            continue
        groups = "  ".join(f"{_span(p.groups[k], node_of_rank):<16}" for k in GROUP_KINDS)
        rows.append(f"{p.rank:>5} {p.node_index:>4} {p.node_id[:14]:<14} {p.node_ip[:15]:<15} {p.gpu_id:>4}  {groups}")
    return "\n".join(rows)


def topology_dict(layout: Layout, placements: list[RankPlacement], workers_per_node: int) -> dict:
    """What `topology.json` holds: the degrees and, per rank, its node, GPU and group members."""
    return {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "edp": layout.edp,
            "world_size": layout.world, "workers_per_node": workers_per_node,
            "num_nodes": layout.world // workers_per_node, "ranks": [asdict(p) for p in placements]}


def write_topology(path: str, layout: Layout, placements: list[RankPlacement], workers_per_node: int) -> None:
    """One rank per line, so the file stays readable for hundreds of ranks."""
    d = topology_dict(layout, placements, workers_per_node)
    ranks = d.pop("ranks")
    head = json.dumps(d, indent=2)[:-2]
    body = ",\n".join("    " + json.dumps(r) for r in ranks)
    with open(path, "w") as f:
        f.write(f'{head},\n  "ranks": [\n{body}\n  ]\n}}\n')
