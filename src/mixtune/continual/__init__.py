"""Continual instruction tuning: stage sequences with replay buffers, for any mixer.

- :mod:`mixtune.continual.config`: the continual config (``stages:``), expanded into one run
  config per stage.
- :mod:`mixtune.continual.driver`: runs a sequence stage by stage and writes the accuracy/loss
  matrices, average accuracy, forgetting and safety (JSON, markdown, plot).
- :mod:`mixtune.continual.run`: every sequence of a config (``mixtune proxymix run``).

ProxyMix, the replay controller learned on a proxy, is :mod:`mixtune.mixers.proxymix`.
"""
