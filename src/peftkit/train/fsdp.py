"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under ``--strategy fsdp`` every transformer block (the elements of the model's longest
``ModuleList`` of layers, as `core.arch` finds them) is sharded over a one-dimensional device mesh
of all processes, then the model itself (embeddings, task head, soft prompts and prefixes: what is
outside the blocks). A block's frozen base weights and the adapter sites inside it are one FSDP
group: FSDP2 shards each parameter along its first dimension, whatever its dtype or
``requires_grad``, all-gathers a block just before it runs and frees it after, and reduce-scatters
the gradients of the trainable ones. A quantized base (QLoRA) shards its packed 4-bit storage the
same way: the storage tensors become frozen parameters for FSDP to shard.

What FSDP changes for peftkit:

- parameters become ``DTensor`` shards: what reads a parameter's values outside the model's forward
  (saving, the head probe) gathers or distributes them here (`gathered`, `assign`);
- the adapter file is gathered on rank 0 and written in the usual format. Its base fingerprint is
  taken before sharding (`shard` returns it), since the base is frozen;
- every process must run the same forwards (each forward all-gathers), so evaluation pads the
  shorter shares (`trainer.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..core.arch import block_list
from ..core.linear import is_quantized
from ..errors import PeftkitError
from .distributed import Dist


class ShardingError(PeftkitError):
    """A run asked for something that sharded training (FSDP) cannot do."""


def unshardable(method: str) -> str | None:
    """Why registered method `method` cannot train sharded (its own declaration), or None."""
    return registry.get(method).unshardable


def check_method(method: str, strategy: str) -> None:
    """Refuse, up front, a method that cannot train under `strategy`."""
    why = unshardable(method) if strategy == "fsdp" else None
    if why:
        raise ShardingError(f"method {method!r} cannot train with --strategy fsdp: {why}; use "
                            "--strategy ddp, or another method.")


@dataclass
class Sharded:
    """What `shard` leaves for saving: the device mesh and each adapter's base fingerprint."""

    mesh: Any
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one: the elements of the longest ModuleList of layers."""
    found = block_list(model)
    return list(found) if found is not None else []


def shard(tuned: Any, dist: Dist) -> Sharded:
    """Shard `tuned` (a TunedModel with its adapters attached) in place: each transformer block, then
    the whole model; FSDP moves each process's shards to ``dist.device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..core.files.peftkit_format import base_fingerprint

    fingerprints = {name: base_fingerprint(tuned, name) for name in tuned.adapters} if dist.main else {}
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for module in tuned.modules():
        if is_quantized(module) and hasattr(module, "storage_as_parameters"):
            module.storage_as_parameters()
    for block in blocks(tuned.model):
        fully_shard(block, mesh=mesh)
    fully_shard(tuned, mesh=mesh)
    return Sharded(mesh, fingerprints)


def shard_from_rank0(tuned: Any, dist: Dist) -> Sharded:
    """Shard `tuned`, whose values only rank 0 holds (the other processes built it on the meta device),
    and give every process its shards of rank 0's values, one tensor at a time: no process but rank 0
    ever holds the whole model. (``set_model_state_dict(..., broadcast_from_rank0=True)`` keeps every
    received tensor whole until the end: a whole copy per process.) Buffers are broadcast."""
    import torch.distributed as torch_dist
    from torch.distributed.tensor import distribute_tensor

    whole = tuned.state_dict() if dist.main else {}
    sharded = shard(tuned, dist)
    if not dist.main:
        tuned.to_empty(device=dist.device)
    with torch.no_grad():
        for name, target in tuned.state_dict().items():
            if not is_sharded(target):
                continue
            source = whole.pop(name).to(dist.device) if dist.main else torch.empty(  # rank 0 frees as it goes
                target.shape, dtype=target.dtype, device=dist.device)
            piece = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=0)
            target.to_local().copy_(piece.to_local())
            del source, piece
        for buffer in tuned.buffers():  # non-persistent ones (rotary tables) included
            torch_dist.broadcast(buffer, src=0)
    return sharded


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters FSDP keeps after a forward without backward (the root's: embeddings, head)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor` (itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`, gathered from every process when sharded (all processes must call)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole `value`, also when `param` is sharded (every process passes
    the same value)."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


class Gathered:
    """A sharded TunedModel as the adapter writers see it: adapter tensors gathered whole, the base
    fingerprint taken before sharding. Everything else is the model's."""

    def __init__(self, tuned: Any, states: dict[str, dict[str, torch.Tensor]],
                 fingerprints: dict[str, dict[str, Any]]) -> None:
        self._tuned, self._states, self._fingerprints = tuned, states, fingerprints

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tuned, name)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return self._states[name]

    def pinned_fingerprint(self, name: str) -> dict[str, Any]:
        return self._fingerprints[name]


def gathered(tuned: Any, sharded: Sharded, names: list[str] | None = None) -> Gathered:
    """Adapter `names` (default: all) of sharded `tuned`, gathered whole on every process (all must
    call, in the same order: one all-gather per sharded tensor)."""
    names = list(tuned.adapters) if names is None else names
    states = {}
    for name in names:
        states[name] = {k: full(v.detach()).cpu() for k, v in tuned.adapter_state(name).items()}
    return Gathered(tuned, states, sharded.fingerprints)


def trainable_state(tuned: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: shards under FSDP, whole tensors otherwise. The names are
    the same either way, so `torch.distributed.checkpoint` moves them between the two."""
    return {name: p for name, p in _named_trainable(tuned)}


def _named_trainable(tuned: Any) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in tuned.named_parameters():
        if p.requires_grad:
            yield name, p


def memory_share(tuned: Any) -> tuple[int, int]:
    """(bytes of parameters and buffers this process holds, bytes of the whole model)."""
    mine = whole = 0
    for t in [*tuned.parameters(), *tuned.buffers()]:
        size = t.element_size()
        mine += local(t).numel() * size
        whole += t.numel() * size
    return mine, whole
