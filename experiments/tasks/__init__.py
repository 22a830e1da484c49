r"""The experiments, one module each, named as the experiment: its config dataclass, its
:class:`~experiments.experiment.Task`, its results row, its runs and ``EXPERIMENT``.
:mod:`experiments.experiment` finds them; the helpers they share are in
:mod:`experiments.common`."""
