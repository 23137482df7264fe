"""Stage 6, tracking: the windows on a search, MLflow and the terminal.

Owns MLflow (the only stage that imports it): the search as a parent run, one child run per
trial, the front and plots as artifacts, calibration runs, and the UI server; the pictures and
tables of a search (``plots``, ``pareto_page``) and what the terminal shows (``progress``). It
comes before ``search`` because the runner drives it while a study runs; it needs nothing of
the search itself. May import: ``config``, ``workload``, ``space``, ``compress``, ``cost``.
"""
