"""Scale-out on torch.distributed: data parallel (DDP) or sharded (FSDP2); gloo on CPU, NCCL on GPU.

Launch with ``torchrun --nproc_per_node N -m peftkit train ...`` (several machines: ``torchrun
--nnodes M --node_rank K --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` on each), or with
``accelerate launch -m peftkit train ...``: each process reads RANK / WORLD_SIZE / LOCAL_RANK from
the environment, takes its slice of every global batch (``batch_size`` per process), and the
gradients are averaged over processes. Losses are weighted by each slice's share of the global
batch, so N processes with batch b give the same update as one process with batch N·b. Only global
rank 0 logs and writes files (a node's local rank 0 writes nothing).

``--strategy``: ``ddp`` keeps a whole model on every process and all-reduces the gradients of the
trainable parameters; ``fsdp`` shards the frozen base and the adapters over the processes
(`train/fsdp.py`), for a base that does not fit one device; ``auto`` is ddp when there is more than
one process. With one process there is nothing to distribute and both are plain training.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none (one process), ddp or fsdp
    owns_group: bool = False  # setup() joined the process group (and teardown() leaves it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def setup(strategy: str = "auto") -> Dist:
    """Join the process group when launched by torchrun / accelerate; pick this process's device.
    `strategy` (auto, ddp, fsdp) applies when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(device=device)
    owns = not dist.is_initialized()  # a caller that joined already keeps its group
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                strategy="ddp" if strategy == "auto" else strategy, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.enabled and d.owns_group and dist.is_initialized():
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


def no_sync(model: torch.nn.Module, d: Dist) -> contextlib.AbstractContextManager[None]:
    """Inside: backward accumulates gradients locally, without reducing them over processes."""
    if d.strategy == "ddp":
        return model.no_sync()
    if d.sharded:
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def broadcast(d: Dist, value: Any) -> Any:
    """Rank 0's `value` (a picklable object) on every process."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around `model` under the ddp strategy (gradients of trainable parameters only are reduced);
    `model` itself otherwise (FSDP shards it in place: `fsdp.shard`)."""
    if d.strategy != "ddp":
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if d.device.type == "cuda" else None
    # buffers (position ids, masks) are identical on every rank: no need to re-send them each step
    params = inspect.signature(DistributedDataParallel).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{option: False})
