"""DynaMiCS: constrained dynamic mixtures from probing slope matrices (``mixer.name: dynamics``).

- :mod:`~mixtune.mixers.dynamics.mixer`: the mixer, its options and its update rule;
- :mod:`~mixtune.mixers.dynamics.schedule`: the paper's update steps, scaled, and the horizon;
- :mod:`~mixtune.mixers.dynamics.slopes`: the slope matrix (probes or gradient alignment) and
  its noise;
- :mod:`~mixtune.mixers.dynamics.solver`: the penalised problem, the (λ, ε) grid and the
  selection rule; :mod:`~mixtune.mixers.dynamics.minimisers`: its exact minimisers.
"""
