"""Stage 2, workload: the model, its data and its task, and the dense reference.

Owns the built-in models and a user's model factory (``models``, ``factory``), the three data
splits of every source (``data``, ``splits``, ``data_factory``, ``task_builtins``), the task's
loss, metric and distillation (``task``), evaluation (``evaluate``), devices and eval mode
(``devices``) and the trained, cached dense model (``dense``). May import: ``config``.
"""
