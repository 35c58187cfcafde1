"""The presets: which entries a bench runs, with how many seeds, on what budget.

- ``quick`` — one method per family (the first of each family's list that fits the model: BitFit needs
  bias terms, so a Llama-style model gets LayerNorm tuning), ``full``, ``head-only`` and, for a causal
  LM, ``zero-shot`` and ``few-shot``; 2 seeds; 150 steps per run, scored on 1000 held-out examples,
  forgetting on 500 examples. Sized to finish within an hour on a 2-core CPU for MiniLM on Rotten
  Tomatoes (the measurements: ``benchmarks/results/bench.md``).
- ``all`` — every registered method with its default options (``compose`` as LoRA + LayerNorm tuning,
  ``adalora`` scheduled over the run's steps) and every baseline that fits; 3 seeds; one epoch per
  run (``--max-steps`` caps it), scored on the whole held-out set.

Baselines that do not fit the task (``zero-shot`` on an encoder, ``head-only`` without a task head)
are left out of a preset; named in ``--methods`` they are an error.
"""

from __future__ import annotations

import dataclasses

from ..core import registry
from .spec import BASELINES, TRAINED_BASELINES, RunSpec, parse_entry

QUICK_FAMILIES = {"additive": ("adapter",), "reparameterized": ("lora",), "partial": ("bitfit", "ln_tuning"),
                  "hybrid": ("mam",), "unified": ("sparse_adapter",)}
# options for methods whose defaults do not make a run on their own
ALL_OPTIONS = {"compose": "parts=[{method: lora}, {method: ln_tuning}]"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """`max_steps` None: one epoch; `max_eval_examples` None: the whole held-out set."""

    name: str
    seeds: int
    max_steps: int | None
    max_eval_examples: int | None
    forgetting_examples: int

    def choices(self) -> list[list[RunSpec]]:
        """The preset's entries, each a list of alternatives (the first that fits the model runs)."""
        if self.name == "quick":
            methods = [[parse_entry(m) for m in names] for names in QUICK_FAMILIES.values()]
        else:
            skip = set(TRAINED_BASELINES.values())
            methods = [[dataclasses.replace(parse_entry(f"{m}:{ALL_OPTIONS[m]}"), label=m) if m in ALL_OPTIONS
                        else parse_entry(m)] for m in registry.methods() if m not in skip]
        return methods + [[parse_entry(b)] for b in BASELINES]


PRESETS = {
    "quick": Preset("quick", seeds=2, max_steps=150, max_eval_examples=1000, forgetting_examples=500),
    "all": Preset("all", seeds=3, max_steps=None, max_eval_examples=None, forgetting_examples=1000),
}
