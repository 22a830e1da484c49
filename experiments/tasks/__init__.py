r"""The experiments, one module each (a config, a :class:`~experiments.tasks.base.Task`, a
results row, its runs and ``EXPERIMENT``), and the helper modules they share (``base``,
``digits``, ``judge``). :mod:`experiments.registry` finds the experiments."""
