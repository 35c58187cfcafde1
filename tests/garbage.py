"""Hypothesis strategies for hostile input (option values, target specs, option strings, data files)
and a fingerprint that tells whether a model was changed at all. Used by test_properties.py."""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from peftkit.core import registry
from peftkit.core.host import Host

# -- values of every type ------------------------------------------------------------------------------
SPECIAL_NUMBERS = [0, -1, 1, 2, True, False, 2**31, 2**63, -(2**63), 10**18, 10**400, 0.0, -0.0, 0.5, 1.0, 1e-300,
                   5e-324, 1e308, math.nan, math.inf, -math.inf, 16.0]
ODD_OBJECTS = [object(), 1 + 2j, b"bytes", bytearray(b"x"), frozenset({1}), {1, 2}, datetime.date(2001, 1, 1),
               torch.tensor(1.0), torch.float16, "\x00", "\ud800", "\u202e", "\n", " ", ""]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),  # huge ones come from SPECIAL_NUMBERS: mid-size ones would really be allocated
    st.sampled_from(SPECIAL_NUMBERS),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(ODD_OBJECTS),
)

garbage = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()), inner, max_size=3),
    ),
    max_leaves=8,
)


# -- realistic values, per option -------------------------------------------------------------------------
def _words_of_modules() -> list[str]:
    """Every string constant the method modules offer as a choice (INITS, ACTIVATIONS, ...)."""
    words: set[str] = set()
    for spec in registry.specs():
        for value in vars(sys.modules[spec.config_cls.__module__]).values():
            if isinstance(value, tuple | set | frozenset | dict) and value and all(isinstance(v, str) for v in value):
                words.update(value)
    return sorted(words)


CHOICE_WORDS = _words_of_modules() + ["float16", "bfloat16", "fp32", "torch.float32", "text", "auto"]
TARGET_WORDS = ["query", "value", "key", "dense", "q_proj", "v_proj", "o_proj", "c_attn", "c_proj", "mlp", "attn",
                "all-linear", "classifier", "lm_head", "embed_tokens", "wte", "word_embeddings", "LayerNorm",
                "re:.*\\.query", "re:.*(q|v)_proj", "re:.*", "re:(", "re:[", "re:a{99999999999}", "re:(?P<x", "re:*",
                "type:Linear", "type:Conv1D", "type:Embedding", "type:LlamaRMSNorm", "type:Nope", "type:",
                "bert.encoder.layer.0.attention.self.query", "model.layers.1.self_attn.q_proj", "transformer.h.0",
                "", ".", "..", "0", "query,value", "*"]
LAYER_WORDS = ["0", "1", "-1", "0-1", "1-0", "0-3,5", "-2:", ":", "::", "1:", ":1", "0:2:0", "1:2:3:4", "-", "--1",
               "0--1", "-1-0", "a-b", "1,,2", ",", "", " ", "1.5", "0x1", "٣", "²", "1e3", "9" * 30, "-" + "9" * 30,
               "9" * 5000]

spec_entry = st.one_of(st.sampled_from(TARGET_WORDS), st.text(max_size=10),
                       st.builds(lambda s: "re:" + s, st.text(max_size=8)),
                       st.builds(lambda s: "type:" + s, st.text(max_size=8)))
target_specs = st.one_of(st.none(), spec_entry, st.lists(spec_entry, max_size=3), garbage)
layer_specs = st.one_of(
    st.none(), st.integers(-4, 4), st.sampled_from(SPECIAL_NUMBERS), st.sampled_from(LAYER_WORDS),
    st.lists(st.integers(-4, 4), max_size=3), st.lists(st.sampled_from(SPECIAL_NUMBERS), max_size=2),
    st.text(alphabet="0123456789-:, ", max_size=8), garbage,
)
method_dicts = st.builds(lambda m, opts: {"method": m, **opts}, st.sampled_from(registry.methods()),
                         st.dictionaries(st.sampled_from(["r", "targets", "layers", "bottleneck"]),
                                         st.one_of(st.integers(-1, 4), target_specs), max_size=1))


def realistic(kind: str) -> st.SearchStrategy[Any]:
    """Plausible values for an option annotated `kind` (the dataclass field's type, as written)."""
    if kind == "Spec":
        return target_specs
    if kind == "LayerSpec":
        return layer_specs
    if kind.startswith("Sequence[Any]"):
        return st.lists(st.one_of(method_dicts, garbage), max_size=2)
    if kind.startswith("dict"):
        return st.dictionaries(st.one_of(spec_entry, st.sampled_from(registry.methods())),
                               st.one_of(st.integers(-1, 16), st.floats(-1, 32), garbage), max_size=2)
    choices = []
    if "bool" in kind:
        choices.append(st.booleans())
    if "int" in kind:  # small sizes (larger ones would really be allocated), and some past every limit
        choices.append(st.one_of(st.integers(-2, 70), st.sampled_from([2**16 + 1, 2**31, 2**63, 10**30])))
    if "float" in kind:
        choices.append(st.one_of(st.floats(-1, 2), st.floats(0, 64)))
    if "str" in kind:
        choices.append(st.sampled_from(CHOICE_WORDS))
    if "None" in kind:
        choices.append(st.none())
    return st.one_of(*choices) if choices else garbage


def option_values(config_cls: type, name: str, garbage_too: bool = True) -> st.SearchStrategy[Any]:
    field = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    kind = str(field.type)
    return st.one_of(realistic(kind), garbage) if garbage_too else realistic(kind)


def options_for(method: str, max_size: int = 4, unknown: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of options for `method`: its real option names (and, with `unknown`, made-up ones)."""
    cls = registry.get(method).config_cls
    names = cls.option_names()

    @st.composite
    def draw(data: st.DrawFn) -> dict[str, Any]:
        keys = data(st.lists(st.sampled_from(names), max_size=max_size, unique=True))
        out = {k: data(option_values(cls, k)) for k in keys}
        if unknown and data(st.integers(0, 4)) == 0:
            out[data(st.text(min_size=1, max_size=12))] = data(garbage)
        return out

    return draw()


# -- option strings and data files ------------------------------------------------------------------------
OPTION_PIECES = ["r=8", "alpha=16", "targets=[query,value]", "k=", "=v", "=", ",", "[", "]", "{", "}", "(", ")", "'",
                 '"', "!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "&a", "*a",
                 "!!binary", "- x", ": ", "? ", "|", ">", "%TAG", "---", "...", "#", "@", "`", "\t", "\n", "\x00",
                 "\x85", "\ufeff", "layers=-2:", "layers=0-3,5", "dropout=.nan", "r=.inf", "r=1e999", "r=0x10",
                 "r=0o7", "r=1_000", "when=2001-01-01", "when=2001-13-45", "r=" + "9" * 5000, "x=" + "[" * 200,
                 "x=" + "[" * 1000 + "]" * 1000, "x=&a [*a]", "x={a: &b [*b]}", "y=" + "{a: " * 60,
                 "method=lora", "targets=re:.*", "yes", "no", "on", "~", "null"]
option_strings = st.one_of(
    st.text(max_size=60),
    st.sampled_from(OPTION_PIECES),
    st.lists(st.one_of(st.sampled_from(OPTION_PIECES), st.text(max_size=6)), max_size=8).map("".join),
    st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["r", "alpha", "targets", "layers", "dropout", "x"]),
                       st.one_of(st.sampled_from(OPTION_PIECES), st.text(max_size=8))), max_size=4).map(",".join),
)

FIELD_NAMES = ["text", "label", "labels", "sentence", "category", "prompt", "response", "", "é", "a,b", "1", None]
CELL_VALUES = [None, "", " ", "0", "1", "-1", "--5", "²", "٣", "1.5", "nan", "inf", "1e400", "9" * 5000, "good",
               "x" * 200_000, True, False, 0, 1, -1, 2**70, 1.5, math.nan, [], [1], {}, {"a": 1}]
cells = st.one_of(st.sampled_from(CELL_VALUES), st.text(max_size=8), st.integers(), st.floats())
LABELS = st.one_of(st.sampled_from(["0", "1", "pos", "neg", 0, 1, 2, -1, 1.0, True]), cells)
records = st.one_of(  # rows of a classification file (with extra fields), or of anything
    st.lists(st.fixed_dictionaries({"text": cells, "label": LABELS}, optional={"prompt": cells, "response": cells}),
             max_size=5),
    st.lists(st.dictionaries(st.sampled_from([n for n in FIELD_NAMES if n is not None]), cells, max_size=3),
             max_size=5),
)


# -- did anything change? -------------------------------------------------------------------------------
@dataclasses.dataclass
class Fingerprint:
    """Everything about a model that attaching could change."""

    tensors: dict[str, torch.Tensor]
    modules: list[tuple[str, type]]
    flags: dict[str, bool]
    hooks: dict[str, tuple[int, ...]]
    modes: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> Fingerprint:
        return cls(
            tensors={k: v.detach().clone() for k, v in model.state_dict().items()},
            modules=[(n, type(m)) for n, m in model.named_modules()],
            flags={n: p.requires_grad for n, p in model.named_parameters()},
            hooks={n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                   for n, m in model.named_modules()},
            modes={n: m.training for n, m in model.named_modules()},
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What differs between this fingerprint and `model` now (empty: bit-identical)."""
        now = Fingerprint.of(model)
        out = []
        if any(isinstance(m, Host) for m in model.modules()):
            out.append("a peftkit Host is left inside the model")
        if now.modules != self.modules:
            out.append("module types or names changed")
        if now.tensors.keys() != self.tensors.keys():
            out.append("state_dict keys changed")
        else:
            out += [f"tensor {k} changed" for k, v in self.tensors.items()
                    if v.dtype != now.tensors[k].dtype or not torch.equal(v, now.tensors[k])]
        for what in ("flags", "hooks", "modes"):
            if getattr(now, what) != getattr(self, what):
                out.append(f"{what} changed")
        return out
