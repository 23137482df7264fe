"""autosparse: search per-layer sparsity and bit-width for the best accuracy/cost trade-offs.

The package is laid out by pipeline stage; a module imports only from its own stage or an
earlier one (``tests/test_layering.py`` enforces it):

    config -> workload -> space -> compress -> cost -> tracking -> search -> export -> cli

The Python API (``autosparse.run_search``, ``open_search``, ``load``; see ``autosparse.api``) is
imported on first use, so ``import autosparse`` stays light and the command line starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SearchResult", "load", "open_search", "run_search"]

if TYPE_CHECKING:
    from autosparse.api import SearchResult, load, open_search, run_search


def __getattr__(name: str) -> Any:
    if name in __all__:
        from autosparse import api

        return getattr(api, name)
    raise AttributeError(f"module 'autosparse' has no attribute {name!r}")
