"""Frozen, self-validating method configurations.

Every method config is a frozen dataclass deriving from `MethodConfig`. Lists (from YAML or the
command line) become tuples; `problems()` yields every invalid option so a user sees them all at
once. `trainable_modules` is an engine option every method has: modules trained as full copies
(``"auto"`` = the task head of a classification/QA model, ``None`` = none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

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
        problems = list(self.problems())
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
