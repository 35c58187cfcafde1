"""Frozen, self-validating method configurations.

Every method config is a frozen dataclass deriving from `MethodConfig`. Lists (from YAML or the
command line) become tuples; `problems()` yields every invalid option so a user sees them all at
once. `trainable_modules` is an engine option every method has: modules trained as full copies
(``"auto"`` = the task head of a classification/QA model, ``None`` = none).

Options typed `Spec` or `LayerSpec` (targets, exclude, layers, ...) are checked here for every
method; a method's `problems()` checks the rest with the helpers at the bottom (`integer`,
`number`, `one_of`, `flag`, `text`, `mapping`), which accept a value of any type and name the
option, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Union

from ..errors import ConfigError, TargetError, did_you_mean, shown
from .targets import LayerSpec, Spec, read_layers

MAX_DEPTH = 32  # list nesting an option may have (deeper: a YAML alias cycle, or a mistake)
# The largest size option (a rank, a bottleneck, a number of virtual tokens, a hidden width): wider
# than any model's hidden size, so anything larger is a mistake (and often one torch cannot allocate).
MAX_SIZE = 2**16


def _freeze(value: Any, name: str, depth: int = 0) -> Any:
    if isinstance(value, list | tuple):
        if depth >= MAX_DEPTH:
            raise ConfigError(f"option {name!r} is nested more than {MAX_DEPTH} lists deep (a cycle?); "
                              "pass plain values or lists of them.")
        return tuple(_freeze(v, name, depth + 1) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options."""

    method: ClassVar[str] = ""
    trainable_modules: Spec = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name), f.name))
        problems = _all_problems(self)
        if problems:
            raise ConfigError(f"invalid {self.method!r} options: " + "; ".join(problems))

    def problems(self) -> Iterable[str]:
        """Yield one message per invalid option (override and call super). It must accept a value of
        any type in any field: use the helpers below rather than comparing values directly."""
        return ()

    def _spec_problems(self) -> Iterable[str]:
        for f in dataclasses.fields(self):
            kind = _SPEC_KINDS.get(f.type if isinstance(f.type, str) else {Spec: "Spec", LayerSpec: "LayerSpec"}.get(f.type))
            if kind is not None:
                yield from kind(f.name, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        out.update({f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)})
        return out

    def replace(self, **changes: Any) -> MethodConfig:
        return build_config(type(self), {**self.to_dict(), **changes})

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class SiteConfig(MethodConfig):
    """Options shared by methods that attach at selected modules. ``targets=None`` means the
    method's default placement for the model's architecture."""

    targets: Spec = None
    exclude: Spec = None
    layers: LayerSpec = None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` declares (bool is not a number; an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
    if origin in (Sequence, list, tuple) or hint in (Sequence, list, tuple):
        return (isinstance(value, list | tuple) and not isinstance(value, str)
                and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list | tuple))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                            for k, v in value.items()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # another typing construct: the class's own checks decide


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin in (Sequence, list, tuple):
        return f"a list of {_describe(args[0])}s".replace("a list of anys", "a list") if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def type_problems(instance: Any) -> list[str]:
    """One message per field of dataclass `instance` whose value does not have its declared type,
    e.g. ``alpha must be a number, got None``. Runs before a class's own `problems()`, which may then
    compare and index its values without guarding against another type."""
    hints = _hints(type(instance))
    return [f"{f.name} must be {_describe(hints[f.name])}, got {getattr(instance, f.name)!r}"
            for f in dataclasses.fields(instance) if not _fits(getattr(instance, f.name), hints[f.name])]


def _all_problems(config: MethodConfig) -> list[str]:
    """The options typed `Spec` / `LayerSpec`, the class's own problems, and every option of the
    wrong type. A class's `problems()` should accept a value of any type (the helpers below do); one
    that compares without them may stop with an exception, and the type messages stand in for what
    it did not get to say."""
    own: list[str] = list(config._spec_problems())
    typed = type_problems(config)
    if not typed:
        return own + list(config.problems())
    try:
        for problem in config.problems():
            own.append(problem)
    except (TypeError, AttributeError, ValueError):
        pass
    named = {p.split(" ", 1)[0] for p in own}
    return own + [p for p in typed if p.split(" ", 1)[0] not in named]


def build_config(cls: type[MethodConfig], options: dict[str, Any]) -> MethodConfig:
    """Instantiate `cls` from a dict, rejecting unknown keys with a suggestion."""
    options = {k: v for k, v in options.items() if k != "method"}
    allowed = cls.option_names()
    unknown = [k for k in options if k not in allowed]
    if unknown:
        hints = "".join(f" {k!r}:{did_you_mean(k, allowed) or ' no close match.'}" for k in unknown)
        raise ConfigError(
            f"unknown option(s) for {cls.method!r}: {', '.join(map(repr, unknown))}.{hints} "
            f"Allowed: {', '.join(allowed)}."
        )
    try:
        return cls(**options)
    except TypeError as err:  # wrong arity etc. from the dataclass itself
        raise ConfigError(f"invalid options for {cls.method!r}: {err}") from None


def check(condition: bool, message: str) -> Iterable[str]:
    """Helper for `problems()`: ``yield from check(is_int(r) and r > 0, f"r must be ..., got {shown(r)}")``
    (the condition is evaluated first, so it must not fail on a value of the wrong type)."""
    if not condition:
        yield message


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``r=True`` is a mistake, not rank 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (an int within the float range), not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def integer(name: str, value: Any, low: int = 1, *, high: int | None = None, optional: bool = False,
            note: str = "") -> Iterable[str]:
    """`value` is an integer >= `low` (and <= `high`, if given), or None when `optional`."""
    if optional and value is None or is_int(value) and value >= low and (high is None or value <= high):
        return
    what = ("a positive integer" if low == 1 else f"an integer >= {low}") + (f" (at most {high})" if high else "")
    yield f"{name} must be {what}{note}{' or None' if optional else ''}, got {shown(value)}"


def size(name: str, value: Any, low: int = 1, *, optional: bool = False, note: str = "") -> Iterable[str]:
    """`value` is a size (rank, width, count of tokens): an integer in [low, MAX_SIZE], or None when `optional`."""
    yield from integer(name, value, low, high=MAX_SIZE, optional=optional, note=note)


def number(name: str, value: Any, rule: str = "", ok: Callable[[float], bool] = lambda _: True, *,
           optional: bool = False) -> Iterable[str]:
    """`value` is a finite number (or None, when `optional`) for which `ok` holds; `rule` says
    which in words (``number("dropout", p, "in [0, 1)", lambda x: 0 <= x < 1)``)."""
    if optional and value is None or is_number(value) and ok(value):
        return
    yield f"{name} must be a number{' ' + rule if rule else ''}{' or None' if optional else ''}, got {shown(value)}"


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> Iterable[str]:
    """`value` is one of `allowed` (compared with its type, so ``1`` is not ``True``)."""
    allowed = list(allowed)
    if not any(type(value) is type(a) and value == a for a in allowed):
        yield f"{name} must be one of {', '.join(map(repr, allowed))}, got {shown(value)}"


def flag(name: str, value: Any, *, optional: bool = False) -> Iterable[str]:
    """`value` is True or False (or None, when `optional`)."""
    if not (isinstance(value, bool) or optional and value is None):
        yield f"{name} must be true or false{' or None' if optional else ''}, got {shown(value)}"


def text(name: str, value: Any, what: str = "a string", *, optional: bool = False) -> Iterable[str]:
    """`value` is a string (or None, when `optional`)."""
    if not (isinstance(value, str) or optional and value is None):
        yield f"{name} must be {what}{' or None' if optional else ''}, got {shown(value)}"


def mapping(name: str, value: Any, values: str = "", ok: Callable[[Any], bool] = lambda _: True) -> Iterable[str]:
    """`value` is a dict with string keys whose values pass `ok` (`values` says what they must be)."""
    if not isinstance(value, dict):
        yield f"{name} must be a mapping of name: value, got {shown(value)}"
        return
    bad = {k: v for k, v in value.items() if not (isinstance(k, str) and ok(v))}
    if bad:
        yield f"{name} must map names (strings) to {values or 'values'}; these do not: {shown(bad)}"


def spec(name: str, value: Any) -> Iterable[str]:
    """`value` is a target spec: None, one entry, or a non-empty list of entries (strings)."""
    if value is None or isinstance(value, str) or (
            isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)):
        return
    yield (f"{name} must be a module name or suffix, 're:<regex>', 'type:<Class>', 'all-linear', a list of "
           f"those, or None; got {shown(value)}")


def layer_spec(name: str, value: Any) -> Iterable[str]:
    """`value` is None or a layers spec `targets.read_layers` can read (an int, a list of ints, "0-3,5", "-2:")."""
    if value is None:
        return
    try:
        read_layers(value)
    except TargetError as err:  # its message names 'layers='
        yield str(err).rstrip(".") if name == "layers" else f"{name}: {err}"


_SPEC_KINDS: dict[str, Callable[[str, Any], Iterable[str]]] = {"Spec": spec, "LayerSpec": layer_spec}
