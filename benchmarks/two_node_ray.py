"""Issue 9: one machine started as two Ray nodes, the launcher joined to it, EP inside vs across nodes.

Starts a Ray head and a second raylet on this machine (each with its own node id and, on GPUs, its own
pair of devices through CUDA_VISIBLE_DEVICES), then runs `python -m launcher` against it:

  one_gpu      1 worker, the baseline (same model, data, global batch and seed)
  dp4_ep2      parallel.dp=4 ep=2: EP groups inside nodes, the all-to-all must move no inter-node bytes
  ep4_refused  parallel.ep=4 across the two nodes without allow_cross_node_ep: must be refused
  ep4_tk1      ep=4 across nodes allowed, router groups = nodes, topk_group=1
  ep4_tk2      the same with topk_group=2, compared with plan mode's inter-node estimate

and prints one table: loss agreement with one GPU, tokens/s per GPU, inter-node bytes measured from the
split sizes and from the routing decisions, nodes per token. Everything lands in --out.

GPU:  NCCL_NVLS_ENABLE=0 python3 benchmarks/two_node_ray.py --out $OUT
CPU rehearsal (deepseek_tiny, few steps): python benchmarks/two_node_ray.py --cpu --out /tmp/two_node
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

PORT = 6388


def ray_cli(args: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()", *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def start_cluster(cpu: bool, cpus_per_node: int, gpus_per_node: int) -> None:
    # Token auth on the cluster and in every launcher that joins it (the launcher uses the caller's mode).
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        ray_cli(["get-auth-token", "--generate"], dict(os.environ))
    base = dict(os.environ)
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]
    for node in range(2):
        env = dict(base)
        if cpu:
            common_n = [*common, "--num-gpus=0"]
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * gpus_per_node + g) for g in range(gpus_per_node))
            common_n = [*common, f"--num-gpus={gpus_per_node}"]
        if node == 0:
            ray_cli(["start", "--head", f"--port={PORT}", "--include-dashboard=false", *common_n], env)
        else:
            ray_cli(["start", f"--address=127.0.0.1:{PORT}", *common_n], env)


def stop_cluster() -> None:
    try:
        ray_cli(["stop", "--force"], dict(os.environ))
    except subprocess.CalledProcessError:
        pass


def launch(name: str, overrides: list[str], out: str) -> dict:
    run_dir = os.path.join(out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "launcher.log"), "w") as f:
        f.write("$ " + " ".join(cmd) + "\n" + p.stdout + p.stderr)
    res = {"name": name, "rc": p.returncode, "wall_s": wall, "cmd": " ".join(["python -m launcher", *overrides]),
           "tail": (p.stdout + p.stderr)[-1500:]}
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mpath):
        res["rows"] = [json.loads(line) for line in open(mpath)]
    tpath = os.path.join(run_dir, "topology.json")
    if os.path.exists(tpath):
        res["topology"] = json.load(open(tpath))
    return res


def plan_inter_node_mb(overrides: list[str]) -> float | None:
    """Plan mode's per-layer, per-micro-batch inter-node dispatch estimate (MB) for this layout."""
    p = subprocess.run([sys.executable, "-m", "launcher", "launcher.mode=plan", *overrides], capture_output=True, text=True)
    m = re.search(r"\(([\d,.]+) MB intra-node, ([\d,.]+) MB inter-node\)", p.stdout)
    return float(m.group(2).replace(",", "")) if m else None


def summarize(r: dict, gpus: int) -> dict:
    rows = r.get("rows", [])
    s = {"name": r["name"], "rc": r["rc"], "wall_s": round(r["wall_s"], 1), "gpus": gpus}
    if not rows:
        return s
    tps = [row["perf/tokens_per_s"] for row in rows]
    s["losses"] = [row["train/loss"] for row in rows]
    s["median_tokens_per_s"] = statistics.median(tps[3:] or tps)
    s["tokens_per_s_per_gpu"] = s["median_tokens_per_s"] / gpus
    if "moe/nodes_per_token_max" in rows[0]:  # ep > 1
        s["inter_node_bytes"] = [row["traffic/inter_node_bytes"] for row in rows]
        s["inter_node_bytes_from_routing"] = [row["traffic/inter_node_bytes_from_routing"] for row in rows]
        s["dispatch_bytes"] = [row["traffic/dispatch_bytes"] for row in rows]
        s["nodes_per_token_max"] = max(row["moe/nodes_per_token_max"] for row in rows)
        s["nodes_per_token_mean"] = statistics.mean(row["moe/nodes_per_token_mean"] for row in rows)
        s["moe_layers"] = sum(k.startswith("traffic/inter_node_bytes/layer_") for k in rows[0])
        if "topology" in r:
            s["inter_node_bytes_all_ranks_mean"] = [all_ranks_inter_node_bytes(row, r["topology"]) for row in rows]
    return s


def all_ranks_inter_node_bytes(row: dict, topo: dict) -> float:
    """Inter-node bytes (dispatch + combine, every MoE layer) averaged over the EP ranks, from the logged
    rank x rank matrices. One rank's share depends on which node holds the popular experts; the mean over
    ranks does not (if every rank routes alike) and is what a uniform-routing estimate predicts."""
    node = [p["node_index"] for p in sorted(topo["ranks"], key=lambda p: p["rank"])]
    ep = topo["ep"]
    layers = [k for k in row if k.startswith("traffic/matrix/layer_")]
    own = sum(sum(v for dst, v in enumerate(row[k][0]) if dst != 0) for k in layers)  # rank 0's sent rows
    bytes_per_row = row["traffic/dispatch_bytes"] / own if own else 0
    inter = sum(v for k in layers for src, vs in enumerate(row[k]) for dst, v in enumerate(vs)
                if node[src] != node[dst])
    return 2 * inter / ep * bytes_per_row


def opt(overrides: list[str], key: str, default: str | None = None) -> str | None:
    """The last value given for `key` (later overrides win, as in Hydra)."""
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "=")), default)


def topology_groups(topo: dict) -> dict:
    """Per group kind, the sorted node indices each distinct group spans (for the report)."""
    node = {p["rank"]: p["node_index"] for p in topo["ranks"]}
    out: dict[str, list] = {}
    for p in topo["ranks"]:
        for kind, members in p["groups"].items():
            spans = sorted({node[r] for r in members})
            out.setdefault(kind, {})[tuple(members)] = spans
    return {kind: list(groups.values()) for kind, groups in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="rehearsal on CPUs with deepseek_tiny")
    ap.add_argument("--out", default="/tmp/two_node")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", default="", help="comma-separated run names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    per_node = 2
    if args.cpu:
        common = ["model=deepseek_tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
                  f"train.steps={args.steps}", "cluster.use_gpu=false", "cluster.cpus_per_worker=1"]
    else:
        common = ["model=deepseek_small", "train.seq_len=2048", "train.global_batch_size=16",
                  "train.micro_batch_size=4", "train.lr=3e-4", f"train.steps={args.steps}", "cluster.use_gpu=true",
                  "cluster.cpus_per_worker=4"]
    common += ["train.eval_every=0", "train.checkpoint_every=0", "train.resume=none", "logger.wandb.mode=disabled",
               "logger.progress_bar=false", f"cluster.address=127.0.0.1:{PORT}"]
    cross = ["parallel.dp=4", "parallel.ep=4", "cluster.num_workers=4", "cluster.workers_per_node=2"]
    runs = {
        "one_gpu": (["cluster.num_workers=1"], 1),
        # The bf16 noise floor: the same run with another micro-batch split (both are valid one-GPU runs).
        "one_gpu_mb16": (["cluster.num_workers=1", "train.micro_batch_size=16"], 1),
        "dp4_ep2": (["parallel.dp=4", "parallel.ep=2", "cluster.num_workers=4", "cluster.workers_per_node=2"], 4),
        "ep4_refused": (cross, 4),
        "ep4_tk1": ([*cross, "parallel.allow_cross_node_ep=true", "model.moe.router.group_by=nodes",
                     "model.moe.router.topk_group=1"], 4),
        "ep4_tk2": ([*cross, "parallel.allow_cross_node_ep=true", "model.moe.router.group_by=nodes",
                     "model.moe.router.topk_group=2"], 4),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    stop_cluster()
    start_cluster(args.cpu, cpus_per_node=per_node * (1 if args.cpu else 8), gpus_per_node=0 if args.cpu else per_node)
    results = {}
    try:
        for name, (ov, gpus) in runs.items():
            r = launch(name, [*common, *ov], args.out)
            s = summarize(r, gpus)
            s["cmd"] = r["cmd"]
            if "topology" in r:
                s["group_nodes"] = topology_groups(r["topology"])
            if r["rc"] != 0:
                s["tail"] = r["tail"]
            given = [*common, *ov]
            s["micro_batches"] = int(opt(given, "train.global_batch_size")) // (
                int(opt(given, "train.micro_batch_size")) * int(opt(given, "parallel.dp", "1")))
            if name == "ep4_tk2":
                s["plan_inter_node_mb_per_layer_micro"] = plan_inter_node_mb([*common, *cross,
                                                                             "parallel.allow_cross_node_ep=true"])
            results[name] = s
            print(json.dumps({k: v for k, v in s.items() if k not in ("losses", "inter_node_bytes",
                                                                       "inter_node_bytes_from_routing",
                                                                       "dispatch_bytes", "group_nodes")}), flush=True)
    finally:
        stop_cluster()
    report(results, args, common)


def report(results: dict, args, common: list[str]) -> None:
    base = results.get("one_gpu")
    lines = []
    for name, s in results.items():
        line = f"{name}: rc={s['rc']} wall={s['wall_s']}s"
        if "tokens_per_s_per_gpu" in s:
            line += f" tok/s/GPU={s['tokens_per_s_per_gpu']:.0f}"
            if base and "tokens_per_s_per_gpu" in base:
                line += f" ({s['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}x one GPU)"
        if base and "losses" in s and name != "one_gpu" and len(s["losses"]) == len(base.get("losses", [])):
            rel = max(abs(a - b) / abs(b) for a, b in zip(s["losses"], base["losses"]))
            s["max_rel_loss_diff_vs_one_gpu"] = rel
            line += f" max|dloss|/loss vs one GPU={rel:.2e} (loss {s['losses'][0]:.3f}->{s['losses'][-1]:.3f})"
        if "inter_node_bytes" in s:
            equal = s["inter_node_bytes"] == s["inter_node_bytes_from_routing"]
            line += (f" inter-node bytes/step mean={statistics.mean(s['inter_node_bytes']) / 1e6:.1f} MB"
                     f" (split sizes == routing decisions on every step: {equal})"
                     f" nodes/token max={s['nodes_per_token_max']} mean={s['nodes_per_token_mean']:.3f}")
        plan_mb = s.get("plan_inter_node_mb_per_layer_micro")
        if plan_mb and s.get("inter_node_bytes"):  # plan mode prints 0.1 MB steps: tiny models round to 0
            # Plan mode gives one layer's dispatch for one micro-batch; a logged step holds dispatch and
            # combine of every MoE layer over every micro-batch.
            plan_step = 2 * plan_mb * 1e6 * s["moe_layers"] * s["micro_batches"]
            rank0 = statistics.mean(s["inter_node_bytes"])
            every = statistics.mean(s["inter_node_bytes_all_ranks_mean"])
            s["plan_inter_node_bytes_per_step"] = plan_step
            s["measured_over_plan_rank0"] = rank0 / plan_step
            s["measured_over_plan_all_ranks"] = every / plan_step
            line += (f" plan estimate {plan_step / 1e6:.1f} MB/step; measured/plan: rank 0 {rank0 / plan_step:.4f},"
                     f" mean over ranks {every / plan_step:.4f} over {len(s['inter_node_bytes'])} steps")
        lines.append(line)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "two_node_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "two_node_report.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
