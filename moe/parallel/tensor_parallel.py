"""Tensor parallelism with sequence parallelism, through DTensor's parallel styles.

Between blocks the residual stream is a plain local tensor holding this rank's slice of every
sequence, [B, S/tp, D] (sequence parallel). Each block:

    attn_norm, ffn_norm     SequenceParallel: weights replicated, tokens stay sharded
    attention               all-gather the sequence -> column-parallel q/k/v (whole heads per rank)
                            -> row-parallel wo -> reduce-scatter back to [B, S/tp, D]
                            MLA's shared low-rank pieces (wkv_a, kv_norm, wq_a, q_norm) are replicated
    dense MLP, shared       all-gather -> column-parallel gate/up -> row-parallel down -> reduce-scatter
    experts
    router, routed experts  plain tensors on the local tokens: the tp ranks of one data rank act as
                            extra data ranks for routing and expert parallelism (expert TP stays 1)

The embedding is vocab-parallel with its output reduce-scattered onto the sequence; the output head is
column-parallel over the vocabulary and its logits are gathered (every tp rank computes the same loss).

Inside attention the model code runs on DTensors with their global shapes (views and SDPA act on whole
heads), so the model stays unchanged; DTensor's autograd sums the partial gradients of the replicated
pieces. The router's balancing losses count over whole sequences (moe.model.router, `seq_shard_group`),
and the gradients of the remaining plain parameters are summed over tp (moe.parallel.grads).

With pipeline parallelism the plan is applied to one stage's module (moe.parallel.pipeline) after the
stage cut: only the first stage has the embedding, only the last the norm and head, and every stage's
blocks are split over that stage's tp group. The plain [B, S/tp, D] residual stream is what the stages
pass on, each rank to the same tp rank of the next stage (moe.train.pipeline_step).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle


class ReplicateParallel(ParallelStyle):
    """Weights replicated over tp; the (replicated) input is made a DTensor and the output stays one,
    so the partial gradients that flow back from the column-parallel layers are summed by DTensor."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            return (x.redistribute(mesh, (Replicate(),)), *inputs[1:])

        return distribute_module(module, device_mesh, None, input_fn=to_dtensor)


def _swiglu_plan(prefix: str) -> dict[str, ParallelStyle]:
    """Dense SwiGLU (dense layers, shared experts): gather the sequence, split the hidden width."""
    return {
        prefix: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"{prefix}.w_gate": ColwiseParallel(),
        f"{prefix}.w_up": ColwiseParallel(),
        f"{prefix}.w_down": RowwiseParallel(output_layouts=Shard(1)),
    }


def _attention_plan(attn: nn.Module) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        # The input stays a DTensor inside attention: every projection reads the one gathered copy and
        # their partial input gradients add up before a single reduce-scatter.
        "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                   use_local_output=False),
        "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        # SDPA on each rank's whole heads, as plain tensors [B, H/tp, S, d]; the result is heads-sharded again.
        "attn.core": PrepareModuleInputOutput(
            input_layouts=(Shard(1),) * 3, desired_input_layouts=(Shard(1),) * 3, use_local_input=True,
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=False),
    }
    colwise = ColwiseParallel(use_local_output=False)  # heads stay DTensors: global shapes in the model
    if hasattr(attn, "wkv_a"):  # MLA
        plan.update({"attn.wkv_a": ReplicateParallel(), "attn.kv_norm": ReplicateParallel(), "attn.wkv_b": colwise})
        if hasattr(attn, "wq"):
            plan["attn.wq"] = colwise
        else:
            plan.update({"attn.wq_a": ReplicateParallel(), "attn.q_norm": ReplicateParallel(), "attn.wq_b": colwise})
    else:  # GQA
        plan.update({"attn.wq": colwise, "attn.wk": colwise, "attn.wv": colwise})
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the dense part of `model` over `tp_mesh` (modules it lacks are skipped) and tell every router
    that its tokens are sequence slices; the router and routed experts stay plain tensors."""
    from moe.model.moe import MoE

    top: dict[str, ParallelStyle] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)

    tp_group = tp_mesh.get_group()
    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                                          **_attention_plan(block.attn)}
        if isinstance(block.ffn, MoE):
            # Router and routed experts work on this rank's tokens as plain tensors.
            plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                             use_local_output=True)
            if block.ffn.shared is not None:
                plan.update(_swiglu_plan("ffn.shared"))
            block.ffn.router.seq_shard_group = tp_group
        else:
            plan.update(_swiglu_plan("ffn"))
        parallelize_module(block, tp_mesh, plan)

    leftover = [n for n, p in model.named_parameters() if not isinstance(p, DTensor) and not token_local_param(n)]
    if leftover:  # grads.py sums plain gradients over tp: that is only right for token-local parameters
        raise RuntimeError(f"tensor parallelism left plain parameters it does not know: {leftover}")


def token_local_param(name: str) -> bool:
    """Parameters that stay plain tensors under tp and see only this rank's tokens (router, experts)."""
    return ".router." in name or ".experts." in name


def is_tp_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter split over tp (its gradient norm adds up over tp ranks)."""
    return isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
