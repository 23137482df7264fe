"""Stage 3, space: what can be searched in a model, as plain data.

Owns candidates (``candidate``: a hashable per-layer choice that round-trips through JSON), the
layer table found by tracing the model (``discovery``, ``layers``), the channel dependency graph
(``graph``: which channels go together, Torch-Pruning) and its arithmetic (``structure``), and the
search space that maps config rules onto decisions and Optuna params (``search_space``).
May import: ``config``, ``workload``.
"""
