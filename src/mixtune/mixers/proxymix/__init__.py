"""ProxyMix: a replay controller learned by RL on a small proxy, transferred frozen.

- :mod:`~mixtune.mixers.proxymix.mixer`: the mixer (``mixer.name: proxymix``) and its policies;
- :mod:`~mixtune.mixers.proxymix.features`: state features, policy output and reward;
- :mod:`~mixtune.mixers.proxymix.controller`: the policy network and its frozen file;
- :mod:`~mixtune.mixers.proxymix.setting`: the ``mixtune proxymix`` config (a continual config
  plus ``learn`` and ``transfer``);
- :mod:`~mixtune.mixers.proxymix.reinforce`: REINFORCE over episodes of any environment;
- :mod:`~mixtune.mixers.proxymix.learn`: episodes on the proxy (``mixtune proxymix learn``);
- :mod:`~mixtune.mixers.proxymix.transfer`: the pre-transfer check;
- :mod:`~mixtune.mixers.proxymix.run`: the target run with that check
  (``mixtune proxymix run``);
- :mod:`~mixtune.mixers.proxymix.toy`: a synthetic environment with a known best policy.

The stage sequences it runs on are :mod:`mixtune.continual` (method-agnostic); the mixer takes
its stage context through :class:`mixtune.continual.hooks.StageAware`.
"""
