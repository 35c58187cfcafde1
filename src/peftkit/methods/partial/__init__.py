"""Partial (select-form) methods: existing parameters made trainable — BitFit (biases),
LayerNorm tuning, whole-layer tuning, and the two ends of the family used as baselines: full
fine-tuning (every weight) and head only (no backbone weight)."""

from . import bitfit, full, head_only, layer_tuning, ln_tuning  # noqa: F401
