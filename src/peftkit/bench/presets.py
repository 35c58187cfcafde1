"""The presets: which entries a bench runs, with how many seeds, on what budget.

- ``quick`` — one method per family (the first of each family's list that fits the model: BitFit needs
  bias terms, so a Llama-style model gets LayerNorm tuning), ``full``, ``head-only`` and, for a causal
  LM, ``zero-shot`` and ``few-shot``; 2 seeds; 120 steps per run, scored on 1000 held-out examples,
  forgetting on 500 question/answer pairs (an encoder) or 64 blocks of 128 tokens (a language model:
  8k tokens, a stable perplexity at a fraction of a run's cost). Sized to finish within an hour on a 2-core CPU for MiniLM on Rotten
  Tomatoes: 14 training runs whose steps (batch 32) cost about 1–2 s each (LoRA 1.3 s; full
  fine-tuning the most), plus about 35 s per run to start, score and measure it and about 50 s per
  head-only run to fit its head; 120 steps leave a margin of about a quarter of the hour.
- ``all`` — every registered method with its default options (``compose`` as LoRA + LayerNorm tuning,
  ``adalora`` scheduled over the run's steps) and every baseline that fits; 3 seeds; one epoch per
  run (``--max-steps`` caps it), scored on the whole held-out set; forgetting on 1000 pairs or 256 blocks.

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
    forgetting_examples: dict[str, int]  # by forgetting measure: pairs (retrieval) or blocks (perplexity)

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
    "quick": Preset("quick", seeds=2, max_steps=120, max_eval_examples=1000, forgetting_examples={"retrieval": 500, "perplexity": 64}),
    "all": Preset("all", seeds=3, max_steps=None, max_eval_examples=None, forgetting_examples={"retrieval": 1000, "perplexity": 256}),
}
