"""autosparse: search per-layer sparsity and bit-width for the best accuracy/cost trade-offs."""

__version__ = "0.1.0"
