"""``peftkit bench``: the assessment. Which PEFT method, at what cost, and what is lost, measured on the
user's own model and data, over several seeds, against full fine-tuning and baselines that need no training.

Per run (entry × seed) it records the held-out task metric, trainable parameters (with and without the
task head, and as % of the model), the adapter file's bytes, peak training memory (process RSS and the
tensors saved for backward), step and wall time, and forgetting (`forgetting`). Training goes through
peftkit's trainer; each run is a fresh process writing its record as soon as it finishes, so a stopped
bench continues where it was (`record`). The aggregate is a Markdown table, a CSV and three plots.

Modules: `spec` (what ``--methods`` names), `presets`, `settings`, `runner` (plan and run), `worker` (one
run), `prompted` (zero- / few-shot), `forgetting`, `memory`, `record` (the folder), `aggregate`, `plots`,
`progress`.
"""

from .presets import PRESETS
from .runner import BenchPlan, make_plan, run_bench
from .settings import BenchSettings

__all__ = ["PRESETS", "BenchPlan", "BenchSettings", "make_plan", "run_bench"]
