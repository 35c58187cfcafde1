"""Reparameterized methods: a low-rank (or otherwise structured) update foldable into W."""

from . import (
    adalora,  # noqa: F401
    lora,  # noqa: F401
    qlora,  # noqa: F401  (after lora: the recipe builds through it)
)
