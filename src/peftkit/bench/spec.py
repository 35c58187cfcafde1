"""What one bench entry is: a registered method with options, or a baseline, read from ``--methods``.

``--methods`` takes entries such as ``lora``, ``lora:r=16,alpha=32``, ``sparse_adapter:sparsity=0.8``
and the baselines ``full`` (every weight trained), ``head-only`` (the frozen backbone with only the task
head trained), ``zero-shot`` and ``few-shot`` (the base causal LM prompted, with ``k`` training
examples in context for few-shot; no training). Entries are separate arguments or comma-separated; a
comma piece holding ``=`` and no ``:`` continues the options of the entry before it. ``lr`` and
``head_lr`` in an entry's options are training settings (``full:lr=1e-4``), the rest method options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core import registry
from ..errors import ConfigError, did_you_mean
from ..train.config import parse_options, split_top_level

TRAINED_BASELINES = {"full": "full", "head-only": "head_only"}  # baseline -> the registered method it trains
PROMPTED = ("zero-shot", "few-shot")  # the base model prompted, no training
BASELINES = (*TRAINED_BASELINES, *PROMPTED)
TRAIN_KEYS = ("lr", "head_lr")  # options of an entry that are training settings, not method options
FEW_SHOT_K = 4  # examples shown in context when few-shot gets no k=
BASELINE_FAMILY = "baseline"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One bench entry. `method` is the registered method a trained entry runs, or ``zero-shot`` /
    ``few-shot``; `options` its method options (few-shot: ``k``); `train` its training settings."""

    label: str
    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def prompted(self) -> bool:
        return self.method in PROMPTED

    @property
    def baseline(self) -> bool:
        return self.method in PROMPTED or self.method in TRAINED_BASELINES.values()

    @property
    def family(self) -> str:
        return BASELINE_FAMILY if self.baseline else registry.get(self.method).family

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "options": self.options, "train": self.train}


def split_entries(values: list[str]) -> list[str]:
    """``["lora:r=16,alpha=32,bitfit", "full"]`` → ``["lora:r=16,alpha=32", "bitfit", "full"]``."""
    entries: list[str] = []
    for value in values:
        for piece in split_top_level(value):
            if "=" in piece and (":" not in piece or piece.index("=") < piece.index(":")) and entries:
                entries[-1] += "," + piece
            else:
                entries.append(piece)
    return entries


def parse_entry(text: str) -> RunSpec:
    """One ``--methods`` entry as a RunSpec.

    Raises:
        ConfigError: an unknown method or baseline, or options it cannot take.
    """
    name, _, opts = text.strip().partition(":")
    name = name.strip()
    known = [*registry.methods(), *BASELINES]
    if name not in known:
        raise ConfigError(f"--methods: unknown method or baseline {name!r}.{did_you_mean(name, known)} Registered "
                          f"methods: {', '.join(registry.methods())}; baselines: {', '.join(BASELINES)}.")
    try:
        options = parse_options(opts) if opts.strip() else {}
    except ConfigError as err:
        raise ConfigError(f"--methods {text}: {err}") from None
    train = {k: _number(options.pop(k)) for k in TRAIN_KEYS if k in options}
    for key, value in train.items():
        if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"--methods {text}: {key} must be a number > 0, got {value!r}.")
    method = TRAINED_BASELINES.get(name, name)
    if method in PROMPTED:
        _check_prompted(text, method, options, train)
        if method == "few-shot":
            options.setdefault("k", FEW_SHOT_K)
    else:
        try:
            registry.config(method, **options)
        except ConfigError as err:
            raise ConfigError(f"--methods {text}: {err}") from None
    label = {v: k for k, v in TRAINED_BASELINES.items()}.get(name, name) + (f":{opts.strip()}" if opts.strip() else "")
    return RunSpec(label, method, options, train)


def _number(value: Any) -> Any:
    """A rate written ``1e-3`` (which YAML reads as text) as the number it is; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_prompted(text: str, method: str, options: dict[str, Any], train: dict[str, Any]) -> None:
    allowed = {"k"} if method == "few-shot" else set()
    extra = sorted(set(options) - allowed) + sorted(train)
    if extra:
        takes = "only k (examples in context)" if allowed else "no options"
        raise ConfigError(f"--methods {text}: {method} takes {takes}, got {extra[0]!r}.")
    k = options.get("k", FEW_SHOT_K)
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ConfigError(f"--methods {text}: k must be a positive integer (examples in context), got {k!r}.")


def parse_methods(values: list[str]) -> list[RunSpec]:
    """Every entry of ``--methods``, duplicates dropped (the first kept)."""
    specs: dict[str, RunSpec] = {}
    for entry in split_entries(values):
        spec = parse_entry(entry)
        specs.setdefault(spec.label, spec)
    if not specs:
        raise ConfigError("--methods names no method; give e.g. --methods lora,full.")
    return list(specs.values())


def unfit(spec: RunSpec, task: str, causal: bool, has_head: bool, model: str) -> str | None:
    """Why `spec` cannot run on this task and model (None: it can)."""
    if spec.prompted and not causal:
        return (f"{spec.label} prompts the base model and reads its answer, which needs a causal language model; "
                f"{model} is an encoder")
    if spec.method == "few-shot" and task == "lm":
        return "few-shot shows prompt/response or labelled examples in context; task lm has neither"
    if spec.method == "head_only" and not has_head:
        return f"head-only trains the task head alone, and task {task} on {model} has no task head"
    return None
