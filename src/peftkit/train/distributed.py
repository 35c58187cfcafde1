"""Data-parallel scale-out on torch.distributed (DDP): gloo on CPU, NCCL on GPU.

Launch with ``torchrun --nproc_per_node N -m peftkit train ...`` (or ``accelerate launch -m
peftkit train ...``): each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment,
takes its slice of every global batch (``batch_size`` per process), and DDP averages gradients.
Losses are weighted by each slice's share of the global batch, so N processes with batch b give
the same update as one process with batch N·b. Only rank 0 logs and writes files.

Models that do not fit on one device: wrap the base with FSDP instead of DDP
(``torch.distributed.fsdp.fully_shard`` on each transformer block, then on the model) before
attaching adapters, and save with ``tuned.adapter_state()`` gathered on rank 0; or run through
``transformers.Trainer`` with ``--fsdp`` and `peftkit.train.PeftkitCallback`. peftkit's own
trainer ships DDP only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the process group when launched by torchrun / accelerate; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over processes (a no-op in a single process)."""
    if d.enabled:
        tensor = tensor.to(d.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around `model` when distributed (gradients of trainable parameters only are reduced)."""
    if not d.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if d.device.type == "cuda" else None
    # buffers (position ids, masks) are identical on every rank: no need to re-send them each step
    params = inspect.signature(DistributedDataParallel).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{option: False})
