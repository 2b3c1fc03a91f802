"""Leaf helpers shared by every lmrec stage: typed config, manifests, atomic publish, rank-aware logging.

This package imports nothing else of the project (DESIGN.md: imports follow the direction of data)."""

__version__ = "0.1.0"
