"""Where things are in a transformer, found from the module structure rather than a per-model table.

A *block* is an element of the model's longest `ModuleList` whose elements contain an attention
module (a module whose class name contains "Attention"). Inside a block:

- the attention module is the outermost "Attention" module; its linear layers are the attention
  projections, and the **last** of them (registration order) is the output projection;
- query / key / value projections are recognised by the common leaf names (``q_proj``, ``query``,
  ``q_lin``, ...) or a fused projection (``c_attn``, ``qkv_proj``, ``query_key_value``, ``Wqkv``);
- the block's other linear layers form the FFN: the last is the down (output) projection, the
  rest are its input side (up / gate / intermediate);
- the block's normalisation layers are the modules whose class name contains "Norm".

This covers BERT, RoBERTa, DistilBERT, Llama, Mistral, Qwen2, Gemma, GPT-2 and similar families.
Anything else can be targeted explicitly; `roles()` raises a `TargetError` saying which option to set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import TargetError
from .linear import is_linear
from .targets import iter_sites

_QUERY = {"q_proj", "query", "q_lin", "q", "wq", "to_q"}
_KEY = {"k_proj", "key", "k_lin", "k", "wk", "to_k"}
_VALUE = {"v_proj", "value", "v_lin", "v", "wv", "to_v"}
_FUSED_QKV = {"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "in_proj"}


@dataclass
class BlockRoles:
    """Module names (full dotted paths) playing each role in one transformer block."""

    block: str
    attention: str
    query: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)
    fused_qkv: list[str] = field(default_factory=list)
    attn_out: str | None = None
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: str | None = None
    ffn: str | None = None
    norms: list[str] = field(default_factory=list)


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def causal_attention(model: nn.Module) -> bool:
    """Whether the model's self-attention is causal (a decoder), from the flag transformers'
    attention modules carry; bidirectional encoders (BERT) have ``is_causal = False`` or none."""
    return any(getattr(m, "is_causal", None) is True for m in model.modules() if _is_attention(m))


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, module in iter_sites(model):
        if isinstance(module, nn.ModuleList) and len(module) > 0 and any(_is_attention(m) for m in module[0].modules()):
            found.append((name, module))
    return found


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's transformer blocks: its longest ModuleList of layers holding attention (None: none)."""
    lists = _block_lists(model)
    return max(lists, key=lambda item: len(item[1]))[1] if lists else None


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _block_roles(prefix: str, block: nn.Module) -> BlockRoles:
    sites = [(f"{prefix}.{n}", m) for n, m in iter_sites(block)]
    attention = next((n for n, m in sites if _is_attention(m)), None)
    if attention is None:
        raise TargetError(f"no attention module found in {prefix}")
    roles = BlockRoles(block=prefix, attention=attention)
    attn_linear = [n for n, m in sites if n.startswith(attention + ".") and is_linear(m)]
    other_linear = [n for n, m in sites if not n.startswith(attention + ".") and is_linear(m)]
    for name in attn_linear:
        leaf = _leaf(name)
        for bucket, names in ((roles.query, _QUERY), (roles.key, _KEY), (roles.value, _VALUE), (roles.fused_qkv, _FUSED_QKV)):
            if leaf in names:
                bucket.append(name)
    if attn_linear:
        roles.attn_out = attn_linear[-1]
    if other_linear:
        roles.ffn_out = other_linear[-1]
        roles.ffn_in = other_linear[:-1]
        roles.ffn = _common_parent(other_linear, prefix)
    roles.norms = [n for n, m in sites if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters())]
    return roles


def _common_parent(names: list[str], block: str) -> str | None:
    parents = {n.rsplit(".", 1)[0] for n in names}
    return parents.pop() if len(parents) == 1 and parents != {block} else None


def blocks(model: nn.Module) -> list[BlockRoles]:
    """Roles of every transformer block, in order.

    Raises:
        TargetError: no block structure is recognisable; the message says to set targets.
    """
    lists = _block_lists(model)
    if not lists:
        raise TargetError(
            f"cannot find transformer blocks in {type(model).__name__} (no ModuleList of layers with an "
            "attention module); set targets=[...] explicitly for this model."
        )
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [_block_roles(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


def projections(model: nn.Module, *roles: str) -> list[str]:
    """The attention projections playing `roles` (of "query", "key", "value") in every block, or the
    fused qkv projection where a block has one: ``projections(model, "query", "value")``.

    Raises:
        TargetError: a block where neither can be recognised (the message says to set targets).
    """
    names = []
    for block in blocks(model):
        found = [n for role in roles for n in getattr(block, role)] or block.fused_qkv
        if not found:
            raise TargetError(f"cannot recognise the {'/'.join(roles)} projections in {block.attention}; "
                              "set targets=[...] explicitly.")
        names.extend(found)
    return names


def require(roles: BlockRoles, role: str, option: str) -> str:
    """The module playing `role` ("attn_out", "ffn_out", ...) in a block, or a `TargetError` that
    names the option to set instead."""
    name = getattr(roles, role)
    if not name:
        raise TargetError(f"cannot find the {role.replace('_', ' ')} module in {roles.block}; set {option} explicitly.")
    return name


def attention_geometry(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dimension) of the model's self-attention, from its config.

    Raises:
        TargetError: the config does not say (the message names the options to set instead).
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not kv_heads or not head_dim:
        raise TargetError(f"cannot read the attention heads of {type(model).__name__} from its config; "
                          "set num_kv_heads=... and head_dim=... explicitly.")
    return int(kv_heads), int(head_dim)
