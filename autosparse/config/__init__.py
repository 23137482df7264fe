"""Stage 1, config: what a user writes, checked before anything heavy runs.

Owns the search config's schema (``schema``, with its sections in ``sections``, ``space_rules``,
``task_metric`` and ``runtime``), the strict-YAML rules every user file shares
(``validation``), the names of objectives and constraints (``objectives``), the vocabulary of
patterns, bit-widths and criteria (``choices``) and the hardware profile schema with the shipped
profiles (``hardware``, ``profiles/``). May import: nothing of autosparse (standard library,
pydantic and PyYAML only), so a wrong config costs a second, not a torch import.
"""
