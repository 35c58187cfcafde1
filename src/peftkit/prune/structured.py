"""Structured pruning: remove whole attention heads or FFN channels, so the layers really shrink.

Heads (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): in every block the heads of
lowest importance go; a head's query/key/value rows and its columns of the output projection are
removed together. With grouped-query attention whole key/value groups (a KV head and the query heads
sharing it) are removed, so the group ratio is kept. FFN channels: the intermediate neurons of lowest
importance go (rows of the up/gate/intermediate projections, columns of the down projection).

Importance is weight magnitude (no data needed): the L2 norm of everything a head / channel owns.
Every block loses the same number of heads / channels, so where the config can say it (Llama:
``num_attention_heads``, ``num_key_value_heads`` with an explicit ``head_dim``; ``intermediate_size``;
GPT-2 ``n_inner``) it is updated and ``from_pretrained`` reloads the model; otherwise (BERT's heads,
whose size the config ties to the head count) `peftkit.prune.load_pruned` rebuilds the shapes from the
``pruning.json`` that `save_pruned` writes. Blocks and their roles come from `core/arch.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import arch
from ..core.linear import Conv1D, is_quantized, linear_weight
from ..core.targets import set_site
from ..errors import ConfigError, TargetError
from .report import PruneReport, count_params, layer_stats

_HEAD_ATTRS = ("num_attention_heads", "num_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


@torch.no_grad()
def slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A new linear layer (same type) keeping output `rows` and input `cols` of the (out, in) weight."""
    if is_quantized(module):
        raise TargetError("structured pruning works on full-precision layers: prune first, then quantize.")
    weight = linear_weight(module)
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    bias = getattr(module, "bias", None)
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows)
    out_f, in_f = weight.shape
    if isinstance(module, Conv1D):
        new = Conv1D(out_f, in_f)
        new.weight = nn.Parameter(weight.T.contiguous(), requires_grad=module.weight.requires_grad)
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return new


def _replace(model: nn.Module, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    set_site(model, name, slice_linear(model.get_submodule(name), rows, cols))


def _count(fraction: float | None, count: int | None, total: int, what: str) -> int:
    if (fraction is None) == (count is None):
        raise ConfigError(f"give exactly one of fraction= or count= for the {what} to remove per block.")
    n = round(fraction * total) if fraction is not None else count
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction!r}")
    if not isinstance(n, int) or not 0 <= n < total:
        raise ConfigError(f"can remove 0..{total - 1} of the {total} {what} per block, not {n!r}.")
    return n


def _set_attrs(module: nn.Module, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def _head_plan(model: nn.Module) -> tuple[int, int, int]:
    """(kv groups, query heads per group, head dim), checking the block structure supports it."""
    kv_heads, head_dim = arch.attention_geometry(model)
    roles = arch.blocks(model)[0]
    if roles.fused_qkv or not (roles.query and roles.key and roles.value and roles.attn_out):
        raise TargetError(f"head pruning needs separate query/key/value projections; {roles.attention} has "
                          f"{'a fused qkv projection' if roles.fused_qkv else 'no recognisable projections'}. "
                          "Prune FFN channels instead.")
    q_out = linear_weight(model.get_submodule(roles.query[0])).shape[0]
    return kv_heads, q_out // head_dim // kv_heads, head_dim


@torch.no_grad()
def prune_heads(model: nn.Module, fraction: float | None = None, *, count: int | None = None) -> PruneReport:
    """Remove the least important attention heads (key/value groups under GQA) of every block, in place.

    Raises:
        ConfigError: both or neither of fraction / count, or a count outside the block's heads.
        TargetError: no recognisable blocks, fused qkv projections (GPT-2), or quantized layers.
    """
    params_before = count_params(model)
    groups, per_group, head_dim = _head_plan(model)
    n = _count(fraction, count, groups, "attention head groups" if per_group > 1 else "attention heads")
    touched, before = [], {}
    for roles in arch.blocks(model):
        q, k, v, o = roles.query[0], roles.key[0], roles.value[0], roles.attn_out
        norms = torch.zeros(groups)
        for name, q_side in ((q, True), (k, False), (v, False)):
            rows = linear_weight(model.get_submodule(name)).float().pow(2).sum(dim=1)  # (out,)
            norms += rows.view(groups, -1).sum(dim=1) if q_side else rows.view(groups, head_dim).sum(dim=1)
        norms += linear_weight(model.get_submodule(o)).float().pow(2).sum(dim=0).view(groups, -1).sum(dim=1)
        keep = norms.argsort(descending=True)[:groups - n].sort().values  # (groups - n,) in order
        kv_idx = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_idx = (keep[:, None] * per_group * head_dim + torch.arange(per_group * head_dim)).flatten()
        for name in (q, k, v, o):
            before[name] = tuple(linear_weight(model.get_submodule(name)).shape)
        _replace(model, q, rows=q_idx)
        _replace(model, k, rows=kv_idx)
        _replace(model, v, rows=kv_idx)
        _replace(model, o, cols=q_idx)
        attention = model.get_submodule(roles.attention)
        for sub in attention.modules():
            _set_attrs(sub, _HEAD_ATTRS, (groups - n) * per_group)
            _set_attrs(sub, _KV_ATTRS, groups - n)
            if isinstance(getattr(sub, "all_head_size", None), int):
                sub.all_head_size = (groups - n) * per_group * head_dim
        touched += [q, k, v, o]
    config_updated = _update_head_config(model, groups - n, per_group, head_dim)
    return PruneReport(f"heads -{n}/{groups} per block", params_before, count_params(model),
                       layer_stats(model, touched, before),
                       {"removed_per_block": n, "groups": groups, "heads_per_group": per_group,
                        "config_updated": config_updated})


def _update_head_config(model: nn.Module, groups: int, per_group: int, head_dim: int) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "head_dim") or not hasattr(config, "num_key_value_heads"):
        return False  # the config derives the head size from the head count: pruning.json carries the shapes
    config.head_dim = head_dim
    config.num_attention_heads = groups * per_group
    config.num_key_value_heads = groups
    return True


@torch.no_grad()
def prune_channels(model: nn.Module, fraction: float | None = None, *, count: int | None = None) -> PruneReport:
    """Remove the least important FFN intermediate channels of every block, in place.

    Raises:
        ConfigError: as `prune_heads`.
        TargetError: blocks without a recognisable FFN, or quantized layers.
    """
    params_before = count_params(model)
    blocks = arch.blocks(model)
    first = blocks[0]
    if not first.ffn_in or not first.ffn_out:
        raise TargetError(f"cannot find the FFN projections of {first.block}; channel pruning needs them.")
    width = linear_weight(model.get_submodule(first.ffn_out)).shape[1]
    n = _count(fraction, count, width, "FFN channels")
    touched, before = [], {}
    for roles in blocks:
        ins = [model.get_submodule(name) for name in roles.ffn_in]
        norms = linear_weight(model.get_submodule(roles.ffn_out)).float().pow(2).sum(dim=0)  # (width,)
        for layer in ins:
            norms = norms + linear_weight(layer).float().pow(2).sum(dim=1)
        keep = norms.argsort(descending=True)[:width - n].sort().values
        for name in (*roles.ffn_in, roles.ffn_out):
            before[name] = tuple(linear_weight(model.get_submodule(name)).shape)
        for name in roles.ffn_in:
            _replace(model, name, rows=keep)
        _replace(model, roles.ffn_out, cols=keep)
        touched += [*roles.ffn_in, roles.ffn_out]
    config = getattr(model, "config", None)
    updated = [a for a in ("intermediate_size", "n_inner", "ffn_dim") if getattr(config, a, None) == width]
    if config is not None and getattr(config, "n_inner", 0) is None and getattr(config, "n_embd", 0) * 4 == width:
        updated.append("n_inner")  # GPT-2 leaves n_inner None for the default 4 x n_embd
    for attr in updated:
        setattr(config, attr, width - n)
    return PruneReport(f"FFN channels -{n}/{width} per block", params_before, count_params(model),
                       layer_stats(model, touched, before), {"removed_per_block": n, "width": width,
                                                             "config_updated": bool(updated)})
