"""Method implementations, grouped by the survey's five families. Importing this package registers
every method with the core registry."""

from . import additive, hybrid, partial, reparameterized, unified  # noqa: F401
