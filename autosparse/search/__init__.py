"""Stage 7, search: the Optuna study and everything that proposes, scores and reads trials.

Owns one trial's objective (``objective``), the study and its storage (``study``), the search
context every worker rebuilds (``context``), the samplers (``samplers/``: GA on DEAP, BO, grid,
knapsack), budgeted allocation on per-layer sensitivity (``allocation/``, ``sensitivity``,
``sensitivity_study``), multi-fidelity, early stop and re-evaluation, the front and the pick of
a trial (``pareto``, ``front``, ``selection``), and the runner (``runner``, with ``preparation``,
``workers`` and ``report``: the only writers of ``runs/`` besides export). May import every
earlier stage: ``config`` to ``tracking``.
"""
