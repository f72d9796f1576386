"""Continual instruction tuning: stage sequences with replay buffers, and ProxyMix.

- :mod:`mixtune.continual.config`: the continual config (``stages:``), expanded into one run
  config per stage.
- :mod:`mixtune.continual.driver`: runs a sequence stage by stage and writes the accuracy/loss
  matrices, average accuracy, forgetting and safety (JSON, markdown, plot).
- :mod:`mixtune.continual.features` / :mod:`~mixtune.continual.controller`: ProxyMix's state,
  policy network and frozen controller file; :mod:`~mixtune.continual.learn`: REINFORCE on a
  proxy; :mod:`~mixtune.continual.transfer`: the pre-transfer vulnerability check;
  :mod:`~mixtune.continual.toy`: a synthetic environment with a known best policy.
"""
