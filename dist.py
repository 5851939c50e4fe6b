"""torch.distributed glue for `torchrun --nproc_per_node K train.py ...`: process group (gloo on CPU,
NCCL on CUDA), FSDP2 sharding per transformer block, data-parallel maps for sampling / reference
log-probs / eval, and full (unsharded) state dicts for HF-format checkpoints. A single process
needs none of it: every helper is the identity there.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def init():
    """Join the process group when launched by torchrun (it sets WORLD_SIZE; one process too, so
    `--nproc_per_node 1` runs the NCCL / FSDP2 path on one GPU). Returns (rank, world)."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank(), world()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if world() > 1:
        dist.barrier()


def finish():
    """End a torchrun worker once every rank is done: barrier, leave the group, and exit without
    interpreter teardown, where gloo's threads can abort the process ('terminate called without an
    active exception') after all work succeeded. A process not launched by torchrun just returns."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def once(path, compute, write, read):
    """The artefact at `path`, computed only when the file does not exist yet: every rank runs
    `compute()` (it may be collective, e.g. a shard_map), rank 0 writes it atomically with
    `write(path, value)`, and every rank reads the file back with `read(path)`. A killed run that
    is started again finds the file and skips the work."""
    path = Path(path)
    if not path.exists():
        value = compute()
        if rank() == 0:
            write(path, value)
        barrier()
    return read(path)


def shard(model):
    """FSDP2: each transformer block is one shard group, the root holds embeddings, final norm and
    heads. On CUDA, bf16 compute with float32 gradient reduction. `hidden` and `reward` are
    registered as forward methods so the root's parameters are gathered for them too."""
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # inputs are not cast: the RoPE tables stay float32 (bf16 cos/sin lose the positions), and a
    # checkpointed block recomputes with the very inputs its forward saw
    if model.lm_head.weight.is_cuda:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    # Blocks first, then the root: each block's parameters are gathered only while it runs.
    for blk in model.model.layers:
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in ("hidden", "reward"):
        register_fsdp_forward_method(model, name)
    return model


def all_sum(x: float) -> float:
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def shard_map(fn, items):
    """fn(items[rank::world]) on every rank, results gathered on all ranks in the original order.
    fn returns one result per item. With one process: fn(items)."""
    if world() == 1:
        return fn(items)
    # Strided shares keep the ranks' loads even when the items grow longer along the list.
    mine = fn(items[rank()::world()])
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    # Rank r's results go back to the positions it took, so the order is the single-process order.
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def full_state_dict(model):
    """The whole model's state dict on CPU (every rank must call it under FSDP)."""
    if not dist.is_initialized():  # not sharded
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, sd):
    if not dist.is_initialized():
        model.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model, opt):
    """Optimizer state keyed by parameter names, unsharded: resumable on any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=world() > 1)
    return get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model, opt, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
