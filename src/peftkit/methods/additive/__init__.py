"""Additive methods: new trainable modules or inputs next to the frozen network — bottleneck
adapters (sequential, parallel), (IA)³ scaling vectors, soft prompts and key/value prefixes."""

from . import adapter, ia3, p_tuning, parallel_adapter, prefix_tuning, prompt_tuning  # noqa: F401
