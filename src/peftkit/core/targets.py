"""Target selection: turn a user's target spec into the names of the modules ("sites") to adapt.

Shared by every method. A spec is one entry or a list of entries; each entry is

- ``"all-linear"`` — every linear layer except the output head and the task head;
- ``"re:<pattern>"`` — a regular expression that must match the whole module name;
- ``"type:<ClassName>"`` — modules of that class (e.g. ``type:Linear``, ``type:LlamaMLP``);
- anything else — an exact module name or a dotted suffix (``"query"`` matches
  ``bert.encoder.layer.0.attention.self.query``).

``exclude`` takes entries of the same kinds; ``layers`` keeps only sites inside the given layer
indices (``3``, ``[0, 1]``, ``"0-3,5"``, or ``"-2:"`` for the last two). An entry that matches
nothing is an error naming the closest real module names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from ..errors import TargetError, closest, shown
from .host import Host
from .linear import is_linear

Spec = str | Sequence[str] | None
LayerSpec = int | str | Sequence[int] | None

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_INT = re.compile(r"-?[0-9]+")
_RANGE = re.compile(r"(-?[0-9]+)(?:-(-?[0-9]+))?")


def iter_sites(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) for every module that may become a site.

    A module already wrapped by peftkit appears once, under its own name and as its original
    layer; the wrapper's internals (base layer, deltas) are not offered as sites.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if name:
            yield name, (module.base_layer if isinstance(module, Host) else module)
        if isinstance(module, Host):
            continue
        children = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
        stack.extend(reversed(children))


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name (its block index), or None."""
    match = _LAYER_INDEX.search("." + name)
    return int(match.group(1)) if match else None


def num_layers(names: Iterable[str]) -> int:
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def head_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the pretrained backbone that hold parameters: the task head.

    For ``BertForSequenceClassification`` that is ``classifier``; for a causal LM the tied
    output embedding is *not* a task head and is reported by `output_head_names` instead.
    """
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        return []
    output = set(output_head_names(model))
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and name not in output and any(True for _ in child.parameters())
    ]


def output_head_names(model: nn.Module) -> list[str]:
    """Name of the output (vocabulary) projection, if the model has one."""
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    if out is None:
        return []
    return [name for name, module in iter_sites(model) if module is out]


def _unreadable(spec: object) -> TargetError:
    return TargetError(f"cannot read layers={shown(spec)}; use an int, a list of ints, '0-3,5' or a slice "
                       "like '-2:'.")


def _int(text: str, spec: object) -> int:
    if not _INT.fullmatch(text):
        raise _unreadable(spec)
    try:
        return int(text)
    except ValueError:  # more digits than Python converts
        raise _unreadable(spec) from None


def read_layers(spec: LayerSpec) -> list[range] | slice:
    """The layer indices a spec names, before the model's depth is known: ranges of indices (negative
    ones count from the end) or, for ``"-2:"``, a slice. Ranges stay unexpanded, so ``"0-10**9"``
    costs nothing.

    Raises:
        TargetError: not an int, a list of ints, ``"0-3,5"`` or a slice like ``"-2:"``.
    """
    if isinstance(spec, bool) or not isinstance(spec, int | str | list | tuple):  # True is not layer 1
        raise _unreadable(spec)
    if isinstance(spec, int):
        return [range(spec, spec + 1)]
    if not isinstance(spec, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise _unreadable(spec)
        return [range(i, i + 1) for i in spec]
    if ":" in spec:
        parts = spec.split(":")
        bounds = [_int(p.strip(), spec) if p.strip() else None for p in parts]
        if len(parts) > 3 or bounds[2:] == [0]:
            raise _unreadable(spec)
        return slice(*bounds)
    out = []
    for chunk in filter(None, (c.strip() for c in spec.split(","))):
        match = _RANGE.fullmatch(chunk)
        if match is None:
            raise _unreadable(spec)
        lo = _int(match[1], spec)
        hi = _int(match[2], spec) if match[2] else lo
        if hi < lo:
            raise TargetError(f"layers={shown(spec)}: {shown(chunk)} is an empty range; write the smaller index first.")
        out.append(range(lo, hi + 1))
    if not out:
        raise _unreadable(spec)
    return out


def parse_layers(spec: LayerSpec, total: int) -> set[int] | None:
    """Layer indices from ``3``, ``[0, 2]``, ``"0-3,5"`` or a Python slice ``"-2:"``; negative
    indices count from the end.

    Raises:
        TargetError: an index outside the model's ``total`` layers, or an unreadable spec.
    """
    if spec is None:
        return None
    read = read_layers(spec)
    if isinstance(read, slice):
        return set(range(total)[read])
    bad = [i for r in read if r for i in dict.fromkeys((r[0], r[-1])) if not -total <= i < total]
    if bad:
        where = f"0..{total - 1}" if total else "it has no numbered blocks"
        raise TargetError(f"layers {shown(bad)} are out of range: the model has {total} layers ({where}).")
    return {i % total for r in read for i in r}


def _entry_matcher(entry: str, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if entry == ALL_LINEAR:
        skip = set(output_head_names(model)) | set(head_names(model))

        def all_linear(name: str, module: nn.Module) -> bool:
            top = name.split(".")[0]
            return is_linear(module) and name not in skip and top not in skip

        return all_linear
    if entry.startswith("re:"):
        try:
            pattern = re.compile(entry[3:])
        except (re.error, OverflowError, RecursionError) as err:  # bad syntax, huge repeat, deep nesting
            raise TargetError(f"invalid regular expression {shown(entry)}: {err}") from None
        return lambda name, _m: pattern.fullmatch(name) is not None
    if entry.startswith("type:"):
        type_name = entry[5:]
        return lambda _n, module: type(module).__name__ == type_name
    return lambda name, _m: name == entry or name.endswith("." + entry)


def matches(entry: str, name: str, module: nn.Module | None = None, model: nn.Module | None = None) -> bool:
    """Whether one spec entry selects `name` (used for per-module patterns too)."""
    return _entry_matcher(entry, model if model is not None else nn.Module())(name, module or nn.Module())


def as_entries(spec: Spec) -> list[str]:
    """The entries of a spec as a list.

    Raises:
        TargetError: the spec is not a string or a list of strings.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, list | tuple) and all(isinstance(e, str) for e in spec):
        return list(spec)
    raise TargetError(f"a target spec is a module name or suffix, 're:<regex>', 'type:<Class>', 'all-linear' or a "
                      f"list of those; got {shown(spec)}.")


def _no_match_message(entry: str, sites: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, _ in sites]
    if entry.startswith("type:"):
        pool = sorted({type(m).__name__ for _, m in sites})
        near = closest(entry[5:], pool)
    else:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        near = closest(entry.removeprefix("re:"), leaves) or closest(entry, names)
    hint = f" Closest module names: {', '.join(near)}." if near else ""
    return f"target {shown(entry)} matches no module of the model.{hint}"


def select(
    model: nn.Module,
    targets: Spec,
    *,
    exclude: Spec = None,
    layers: LayerSpec = None,
    accept: Callable[[nn.Module], bool] | None = None,
    accept_label: str = "",
) -> list[str]:
    """Names of the modules selected by `targets`, in model order.

    Raises:
        TargetError: an entry (target or exclude) matches nothing, a selected module is of a type
            `accept` rejects, or the filters leave nothing selected. Problems are collected and
            reported together.
    """
    sites = list(iter_sites(model))
    entries = as_entries(targets)
    if not entries:
        raise TargetError("no targets given: pass targets=[...] (module names, suffixes, 're:<regex>', "
                          "'type:<Class>' or 'all-linear').")
    problems: list[str] = []
    chosen: dict[str, nn.Module] = {}
    for entry in entries:
        matcher = _entry_matcher(entry, model)
        hits = [(n, m) for n, m in sites if matcher(n, m)]
        if not hits:
            problems.append(_no_match_message(entry, sites))
            continue
        if accept is not None and entry != ALL_LINEAR:
            usable = [(n, m) for n, m in hits if accept(m)]
            if not usable:
                kinds = sorted({type(m).__name__ for _, m in hits})
                problems.append(
                    f"target {shown(entry)} matches only modules of type {', '.join(kinds)}, which this method "
                    f"cannot adapt (it supports {accept_label or 'other types'}); target their child layers instead."
                )
                continue
            hits = usable
        chosen.update(hits)
    for entry in as_entries(exclude):
        matcher = _entry_matcher(entry, model)
        hits = [n for n, m in sites if matcher(n, m)]
        if not hits:
            problems.append("exclude " + _no_match_message(entry, sites))
        for name in hits:
            chosen.pop(name, None)
    if problems:
        raise TargetError("; ".join(problems))
    wanted = parse_layers(layers, num_layers(n for n, _ in sites))
    if wanted is not None:
        chosen = {n: m for n, m in chosen.items() if layer_index(n) in wanted}
    if not chosen:
        raise TargetError(
            f"targets {shown(entries)} select nothing after exclude={shown(as_entries(exclude))} and "
            f"layers={shown(layers)}; "
            "loosen the filters."
        )
    order = {n: i for i, (n, _) in enumerate(sites)}
    return sorted(chosen, key=order.__getitem__)


def get_site(model: nn.Module, name: str) -> nn.Module:
    """The module at `name`; a wrapped site returns its wrapper."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise TargetError(f"the model has no module named {name!r}.") from None


def base_at(model: nn.Module, name: str) -> nn.Module:
    """The original module at site `name`, under any peftkit wrapper: what a builder adapts."""
    module = get_site(model, name)
    return module.base_layer if isinstance(module, Host) else module


def set_site(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
