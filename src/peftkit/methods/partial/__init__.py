"""Partial methods (the *select* form): existing parameters made trainable — BitFit (biases),
LayerNorm tuning, and whole-layer tuning."""

from . import bitfit, layer_tuning, ln_tuning  # noqa: F401
