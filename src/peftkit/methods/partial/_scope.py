"""What the partial methods may select: the pretrained backbone, never the task or output head
(the head is trained as a full copy through ``trainable_modules``, the output embedding is tied or
frozen)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ...core.targets import head_names, iter_sites, output_head_names


def backbone_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module outside the task head and the output projection."""
    skip = set(head_names(model)) | set(output_head_names(model))
    for name, module in iter_sites(model):
        if name in skip or name.split(".")[0] in skip:
            continue
        yield name, module


def owns(module: nn.Module, param: str) -> bool:
    """Whether `module` itself (not a child) holds parameter `param`."""
    return isinstance(module._parameters.get(param), nn.Parameter)
