"""Unified methods (the *mask* form): SparseAdapter — any delta method under a fixed sparsity mask."""

from . import sparse_adapter  # noqa: F401
