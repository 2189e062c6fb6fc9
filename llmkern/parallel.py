"""Past one GPU: how the trainer wraps a GPT, all through PyTorch's own engine.

``--parallel ddp`` keeps a whole replica (weights, gradients, AdamW state) on every process and
averages gradients (``DistributedDataParallel``). ``--parallel fsdp`` shards them instead with
FSDP2 (``torch.distributed.fsdp.fully_shard``): each ``Block`` is one unit (its parameters are
gathered just before it runs and freed after), then the model itself (embeddings, final norm,
the tied LM head). llmkern's ops run inside the blocks on the gathered, plain tensors.
``auto`` (the default) is DDP unless a replica would not fit the GPU (see ``choose``).

On CUDA the FSDP mixed-precision policy keeps bf16 parameters for compute and reduces
gradients in fp32 (sharded fp32 master weights stay with the optimizer); on a CPU (gloo) it
stays fp32. ``--cpu-offload`` keeps the shards and the optimizer on the host. ``--compile``
compiles each block on its own before sharding, as torchtitan does, so the gathers stay
outside the compiled graphs. ``--activation-checkpointing k`` recomputes every k-th block in
backward (``torch.utils.checkpoint``, RNG state replayed: dropout and attention-dropout seeds
match the forward).
"""
from __future__ import annotations

import functools
import os
import types
from typing import Optional

import torch
from torch import nn

PARALLEL = ("auto", "ddp", "fsdp")
FSDP_STAGES = ("pretrain", "sft")  # stages whose every process runs the same forwards
# bytes per parameter of a DDP replica under AdamW: fp32 weights, gradients, two moments
DDP_BYTES_PER_PARAM = 16
# the fraction of a GPU a replica may take before auto picks FSDP (the rest: activations)
DDP_FIT_FRACTION = 0.5


class ParallelError(ValueError):
    """A parallel option that cannot run in this launch (user error)."""


def choose(parallel: str, model: nn.Module, device: torch.device, world: int) -> str:
    """'ddp' or 'fsdp' for ``--parallel``: ``auto`` is FSDP on several CUDA processes when a
    DDP replica (16 bytes a parameter) would take over half the GPU's memory, DDP otherwise."""
    if parallel != "auto":
        return parallel
    if world < 2 or device.type != "cuda":  # one process holds everything either way
        return "ddp"
    params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if params * DDP_BYTES_PER_PARAM > DDP_FIT_FRACTION * total else "ddp"


def check(cfg, world: int, device: torch.device) -> None:
    """Errors of the parallel options that depend on the launch, before any work."""
    if cfg.parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ParallelError("--parallel fsdp shards the model over the processes of a torchrun "
                            "launch, but this process was not started by torchrun (no WORLD_SIZE): "
                            "launch it with torchrun --nproc_per_node=N -m llmkern train "
                            "--parallel fsdp ...")
    if cfg.parallel == "fsdp" and cfg.stage not in FSDP_STAGES:
        raise ParallelError(f"--parallel fsdp supports --stage {' or '.join(FSDP_STAGES)}, got "
                            f"--stage {cfg.stage} (use --parallel ddp)")
    if cfg.cpu_offload and cfg.parallel != "fsdp":
        raise ParallelError(f"--cpu-offload offloads FSDP shards: it needs --parallel fsdp, got "
                            f"--parallel {cfg.parallel}")
    if cfg.cpu_offload and device.type != "cuda":
        raise ParallelError(f"--cpu-offload moves FSDP shards off the GPU (pinned host memory); "
                            f"this run is on {device}, which holds everything in host memory "
                            f"already")


def blocks(model: nn.Module):
    """The transformer blocks of a GPT (or of a model holding one as ``.gpt``)."""
    inner = getattr(model, "gpt", model)
    return list(inner.transformer.h)


def set_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Recompute every ``every``-th block in backward (0: none, 1: all); returns how many."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"activation checkpointing: every must be an int >= 0, got {every!r}")
    count = 0
    for i, block in enumerate(blocks(model)):
        if every and i % every == 0:
            _checkpoint_block(block)
            count += 1
    return count


def _checkpoint_block(block: nn.Module) -> None:
    """Make ``block`` keep only its input in training and recompute its forward in backward.
    Its forward is replaced on the instance, so names and state_dict keys stay as they were."""
    if not getattr(block, "_llmkern_checkpointed", False):
        # a bound method (not a closure): a deepcopy of the model rebinds it to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._llmkern_checkpointed = True


def _checkpointed_forward(self, x, cache=None, *args, **kwargs):
    inner = functools.partial(type(self).forward, self)
    if cache is None and self.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        # preserve_rng_state (the default) replays the CPU and device RNG: the same masks
        return checkpoint(inner, x, cache, *args, use_reentrant=False, **kwargs)
    return inner(x, cache, *args, **kwargs)


def mixed_precision(device: torch.device, bf16: bool):
    """FSDP's policy: bf16 parameters and compute with fp32 gradient reduction on CUDA when
    ``bf16``; fp32 throughout otherwise (gloo reduces fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, device: torch.device, world: int, bf16: bool = False,
               cpu_offload: bool = False, compile_blocks: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each block, then the root. Returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision(device, bf16),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    layers = blocks(model)
    for i, block in enumerate(layers):
        if compile_blocks:
            block.compile()  # in place: names and state_dict keys unchanged
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_value(tensor: Optional[torch.Tensor]):
    """A float of a scalar that may be a DTensor (clip_grad_norm_ of sharded gradients)."""
    if tensor is None:
        return None
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return float(tensor)


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """A consolidated ``optimizer.state_dict()`` (parameters by index, full tensors) into the
    optimizer of the FSDP-sharded ``model``: each process keeps its shard of every moment.
    The index order is the optimizer's own (same groups, same parameter order as when saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = state["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(order):
        raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} "
                         f"parameters, this model has {len(order)}")
    by_fqn = {"state": {order[i]: v for i, v in state["state"].items()},
              "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_fqn,
                             options=StateDictOptions(full_state_dict=True))
