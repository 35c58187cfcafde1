"""Frozen, self-validating method configurations.

Every method config is a frozen dataclass deriving from `MethodConfig`. Lists (from YAML or the
command line) become tuples; `problems()` yields every invalid option so a user sees them all at
once. `trainable_modules` is an engine option every method has: modules trained as full copies
(``"auto"`` = the task head of a classification/QA model, ``None`` = none).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Union

from ..errors import ConfigError, did_you_mean
from .targets import LayerSpec, Spec


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
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
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        problems = _all_problems(self)
        if problems:
            raise ConfigError(f"invalid {self.method!r} options: " + "; ".join(problems))

    def problems(self) -> Iterable[str]:
        """Yield one message per invalid option (override and call super)."""
        return ()

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
    """The class's own problems, and every option of the wrong type. A class's `problems()` may
    assume its declared types (compare, iterate): with a value of another type it may stop with an
    exception, and the type messages stand in for what it did not get to say."""
    typed = type_problems(config)
    if not typed:
        return list(config.problems())
    own: list[str] = []
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
    """Helper for `problems()`: ``yield from check(r > 0, f"r must be > 0, got {r}")``."""
    if not condition:
        yield message
