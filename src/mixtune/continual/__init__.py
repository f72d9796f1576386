"""Continual instruction tuning: stage sequences with replay buffers, for any mixer.

- :mod:`mixtune.continual.config`: the continual config (``stages:``);
- :mod:`mixtune.continual.stages`: its expansion into one run config per stage;
- :mod:`mixtune.continual.hooks`: what a stage-aware mixer is told and hands back
  (:class:`~mixtune.continual.hooks.StageAware`);
- :mod:`mixtune.continual.driver`: runs a sequence stage by stage and writes the accuracy/loss
  matrices, average accuracy, forgetting and safety (:mod:`mixtune.continual.metrics`: JSON,
  markdown, plot);
- :mod:`mixtune.continual.run`: every sequence of a config, and the summary over them.

Nothing here knows a method: a mixer that needs the stage context declares it.
"""
