"""Several processes under torchrun: the process group, data-parallel wrapping (DDP or FSDP2), and collectives.

Without torchrun every helper here is a no-op on one process, so the training code reads the same either
way. Under torchrun each process binds its GPU (NCCL) or uses gloo on CPU; rank 0 alone reads the
weights and hands them to the others, so no other process ever holds the whole model.
"""

import contextlib
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

# How long a collective may wait. Rank 0 alone reads (and may first download) the weights and writes each
# checkpoint while the others wait in a barrier: 10 minutes, torch's default, is too short for a 70B model.
TIMEOUT = timedelta(hours=2)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def log0(*args):
    if rank() == 0:
        print(*args, flush=True)


def setup():
    """Initialise torch.distributed under torchrun; return this process's device."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        return device
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return torch.device("cpu")


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def sharded(fsdp):
    """Whether wrap_model shards the model: --fsdp under torchrun (one process alone trains unsharded)."""
    return fsdp and dist.is_initialized()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` (picklable) on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(values):
    """Concatenate a picklable list across processes, in rank order."""
    if not dist.is_initialized():
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def max_over_processes(tensor):
    """The element-wise maximum of `tensor` over processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def sum_over_processes(tensor):
    """The element-wise sum of `tensor` over processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (filling a cache, say), then the other processes."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def shard_batches(batches):
    """This process's share of `batches`, as (indices, real) with equal counts on every process:
    FSDP needs every process in every forward, so short shares repeat a batch marked not real."""
    mine = batches[rank()::world_size()]
    count = math.ceil(len(batches) / world_size())
    return [(b, True) for b in mine] + [(mine[0] if mine else batches[0], False)] * (count - len(mine))


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(model, fsdp, dtype, device):
    """Data parallel from rank 0's weights: DDP, or FSDP2 (fully_shard each transformer block, untied
    embedding and LM head, then the root).

    The other processes bring a meta-device model (language_model.load_model with weights=False) and get
    storage here. DDP broadcasts rank 0's parameters and buffers itself. FSDP keeps one shard of each
    parameter per process: rank 0 broadcasts one full tensor at a time and each process keeps its shard.
    With --dtype bf16 FSDP gathers bf16 parameters for compute and reduces gradients in float32 into
    float32 parameters (MixedPrecisionPolicy).
    """
    if not dist.is_initialized():
        return model.to(device)
    if fsdp:
        full = model.state_dict() if rank() == 0 else {}  # before sharding: rank 0's one full copy
        shard(model, bf16=dtype == "bf16")
    if rank() != 0:
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each parameter new storage, untying tied embeddings
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model.to(device), gradient_as_bucket_view=True)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # non-persistent ones, such as rotary frequencies, are in no state dict
        dist.broadcast(buffer, 0)
    return model


def shard(model, bf16):
    """FSDP2 groups: each transformer block, an untied embedding and LM head, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    blocks = set(model._no_split_modules or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding.weight is not head.weight:
        # Untied (Llama-3): groups of their own, gathered only while used and each gradient reduced as
        # soon as it is complete, rather than both held whole by the root through forward and backward.
        for module in (embedding, head):
            fully_shard(module, mp_policy=policy)
    elif isinstance(embedding, torch.nn.Embedding):
        # Tied: the root holds the gathered weight and the LM head's dense gradient through the backward;
        # a sparse gradient (the batch's rows) adds the embedding's share into it without a second
        # vocabulary-sized buffer at the backward's end, where every block's gradient is held too.
        embedding.sparse = True
    # The root too frees its gathered parameters after each forward: no-grad passes (reference, evaluation)
    # would otherwise leave them in place of the sharded ones the optimizer and state dicts refer to.
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
