"""Rebuild a tensor in backward from tensors autograd keeps anyway, instead of keeping the tensor itself.

A delta's backward often needs the input it was given: a low-rank factor's gradient is ``gradᵀ · x``. The frozen
layer beside it does not keep x (its weight takes no gradient), so keeping x is the delta's own cost: a
full activation per adapted input. But x usually comes out of an op whose own backward keeps what made
it — GELU keeps its input, a product keeps both factors, attention's ``bmm`` keeps the probabilities and
the values, a layer norm keeps its input with the row statistics. Rebuilding x from those in backward
costs one elementwise op or one product, and keeps no byte that was not already kept.

`Rebuilder(model).plan(x)` walks x's producers (a few levels: an RMSNorm's output is a product of a
product, attention's output a view of a product) and returns a `Rebuild` when every leaf it needs is a
tensor some producer keeps for its own backward. Each plan shape is checked once per model: the rebuilt
tensor must equal x bit for bit, or that shape keeps x from then on. The ops run as autograd ran them (the
saved operands are those the forward op received, after autocast's casts), so this holds for every
deterministic kernel.

Nothing is rebuilt, and the caller keeps x, when: x takes no gradient (no producer), saved-tensor hooks are
active (activation checkpointing or offloading own the saved tensors then; `transparent` marks a hook that
keeps them as they are), ``torch.compile`` is tracing, an op on the way is not one listed here, or a layer
norm's epsilon is unknown (backward does not keep it: a `Rebuilder` knows those of its model's norms).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_MAX_DEPTH = 6  # attention's output: view <- clone <- transpose <- view <- bmm
_CHECKED_LIMIT = 4096
_enabled = True

# A step: (op, params, operands); an operand is a leaf index (int) or another step.
Step = tuple[str, tuple, tuple]
EpsOf = Callable[[torch.Tensor | None], float | None]


@dataclass
class Rebuild:
    """How to compute a tensor again: `step` applied to `leaves` (tensors producers keep for backward)."""

    leaves: list[torch.Tensor]
    step: Step

    def signature(self) -> tuple:
        return self.step, tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in self.leaves)


def run(step: Step, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor `step` rebuilds from `leaves` (a `Rebuild`'s, or the same tensors as saved for backward).
    Kept apart from `Rebuild` so that a caller can save the leaves for backward and keep only the step."""
    with torch.no_grad(), torch.autocast(leaves[0].device.type, enabled=False):
        return _run(step, leaves)


def saved_form(rebuilder: Rebuilder | None, x: torch.Tensor, needed: bool,
               kept: torch.Tensor | None = None) -> tuple[list[torch.Tensor], Step | None]:
    """What a backward that needs `x` saves, and the step that gives x back (`restored`): the leaves that
    rebuild x when `rebuilder` finds a plan; else `kept` (x as the caller uses it, x by default) and no step;
    nothing when x is not `needed`."""
    if not needed:
        return [], None
    source = rebuilder.plan(x) if rebuilder is not None else None
    if source is None:
        return [x if kept is None else kept], None
    return source.leaves, source.step


def restored(step: Step | None, saved: Sequence[torch.Tensor]) -> torch.Tensor:
    """x again from what `saved_form` gave: rebuilt by `step`, or the tensor kept."""
    return run(step, saved) if step is not None else saved[0]


def _run(step: Step | int, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(step, int):
        return leaves[step]
    op, params, operands = step
    return _OPS[op][1](params, *(_run(o, leaves) for o in operands))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Keep inputs as they are while the block runs (for comparisons: the two must compute the same)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def transparent(pack: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """Mark a saved-tensor pack hook that keeps tensors as they are (one that counts saved bytes, say):
    rebuilds go on under it. Under any other hook nothing is rebuilt, since reading a producer's saved
    tensor would run that hook's unpack (a checkpoint's recomputation, an offload's copy back) in forward."""
    pack.__peftkit_transparent__ = True  # type: ignore[attr-defined]
    return pack


def _hooks_allow() -> bool:
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: may go away
    if top_hooks is None:
        return False
    hooks = top_hooks(False)
    return hooks is None or getattr(hooks[0], "__peftkit_transparent__", False)


class Rebuilder:
    """Plans rebuilds of the inputs of one model's deltas: knows the epsilon of the model's layer norms
    (their backward keeps everything else a rebuild needs) and which plan shapes were checked exact."""

    def __init__(self, model: nn.Module) -> None:
        self._eps: dict[int, tuple[weakref.ref, float]] = {}  # id(weight) -> (the weight, eps)
        self._checked: dict[tuple, bool] = {}  # plan signature -> rebuilt bit for bit when first tried
        for module in model.modules():
            eps, weight = getattr(module, "eps", None), getattr(module, "weight", None)
            if isinstance(module, nn.LayerNorm) and isinstance(eps, float) and isinstance(weight, torch.Tensor):
                self._eps[id(weight)] = (weakref.ref(weight), eps)

    def __getstate__(self) -> dict[str, Any]:  # weak references do not pickle: a copy forgets the epsilons
        return {"_eps": {}, "_checked": {}}

    def _eps_of(self, weight: torch.Tensor | None) -> float | None:
        found = self._eps.get(id(weight)) if weight is not None else None
        return found[1] if found is not None and found[0]() is weight else None

    def plan(self, x: torch.Tensor) -> Rebuild | None:
        """A checked way to rebuild `x` from tensors its producers keep for backward, or None (keep x)."""
        if not _enabled or x.grad_fn is None or torch.compiler.is_compiling() or not _hooks_allow():
            return None
        leaves: list[torch.Tensor] = []
        step = _plan(x.grad_fn, leaves, 0, self._eps_of)
        if step is None or any(t.layout != torch.strided for t in leaves):
            return None
        rebuild = Rebuild(leaves, step)
        key = rebuild.signature()
        exact = self._checked.get(key)
        if exact is None:
            try:
                rebuilt = run(step, leaves)
                exact = rebuilt.shape == x.shape and rebuilt.dtype == x.dtype and torch.equal(rebuilt, x.detach())
            except RuntimeError:  # e.g. a view of a layout the rebuilt tensor does not have
                exact = False
            if len(self._checked) >= _CHECKED_LIMIT:
                self._checked.clear()
            self._checked[key] = exact
        return rebuild if exact else None


# -- the producers a rebuild can go through: node name -> (operands and params, the op) ---------------------
Operand = torch.Tensor | int | None  # a kept tensor, the index of the producer input to rebuild, or missing
Analysis = tuple[tuple, list[Operand]]


def _output_meta(node: Any) -> Any:
    return node._input_metadata[0]  # the gradient a node receives has its output's shape and dtype


def _kept_or_rebuilt(*names: str) -> Callable[[Any, EpsOf], Analysis]:
    def analyse(node: Any, eps_of: EpsOf) -> Analysis:
        kept = [getattr(node, name) for name in names]
        return (), [t if t is not None else i for i, t in enumerate(kept)]
    return analyse


def _layer_norm(node: Any, eps_of: EpsOf) -> Analysis | None:
    eps = eps_of(node._saved_weight)
    if eps is None:
        return None
    return (tuple(node._saved_normalized_shape), eps), [node._saved_input, node._saved_weight, node._saved_bias]


_OPS: dict[str, tuple[Callable[[Any, EpsOf], Analysis | None], Callable[..., torch.Tensor]]] = {
    "GeluBackward0": (lambda n, _: ((n._saved_approximate,), [n._saved_self]),
                      lambda p, x: F.gelu(x, approximate=p[0])),
    "SiluBackward0": (lambda n, _: ((), [n._saved_self]), lambda p, x: F.silu(x)),
    "MulBackward0": (_kept_or_rebuilt("_saved_self", "_saved_other"), lambda p, a, b: torch.mul(a, b)),
    "BmmBackward0": (lambda n, _: ((), [n._saved_self, n._saved_mat2]), lambda p, a, b: torch.bmm(a, b)),
    "NativeLayerNormBackward0": (_layer_norm, lambda p, x, w, b: torch.native_layer_norm(x, list(p[0]), w, b, p[1])[0]),
    "ViewBackward0": (lambda n, _: ((tuple(_output_meta(n).shape),), [0]), lambda p, x: x.view(p[0])),
    "UnsafeViewBackward0": (lambda n, _: ((tuple(_output_meta(n).shape),), [0]), lambda p, x: x.view(p[0])),
    "ToCopyBackward0": (lambda n, _: ((_output_meta(n).dtype,), [0]), lambda p, x: x.to(p[0])),
    "TransposeBackward0": (lambda n, _: ((n._saved_dim0, n._saved_dim1), [0]), lambda p, x: x.transpose(*p)),
    "PermuteBackward0": (lambda n, _: ((tuple(n._saved_dims),), [0]), lambda p, x: x.permute(p[0])),
    # ``.contiguous()`` of a transposed attention output; another layout fails the first check, never silently
    "CloneBackward0": (lambda n, _: ((), [0]), lambda p, x: x.clone(memory_format=torch.contiguous_format)),
}


def _plan(node: Any, leaves: list[torch.Tensor], depth: int, eps_of: EpsOf) -> Step | None:
    if node is None or depth > _MAX_DEPTH:
        return None
    entry = _OPS.get(node.name())
    if entry is None:
        return None
    try:
        analysis = entry[0](node, eps_of)
    except RuntimeError:  # a saved tensor already freed (a second forward through a used graph)
        return None
    if analysis is None:
        return None
    params, operands = analysis
    steps: list[Step | int] = []
    for operand in operands:
        if isinstance(operand, torch.Tensor):
            leaves.append(operand)
            steps.append(len(leaves) - 1)
        elif isinstance(operand, int):  # not kept: rebuild it from the node that made it
            producer, output = node.next_functions[operand]
            inner = _plan(producer, leaves, depth + 1, eps_of) if output == 0 else None
            if inner is None:
                return None
            steps.append(inner)
        else:
            return None
    return node.name(), params, tuple(steps)
