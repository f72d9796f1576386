"""Losses: per-token losses, the one reduction, and the training objectives.

- :mod:`~mixtune.losses.core`: ``token_losses``, ``reduce`` (exact under gradient accumulation),
  ``LossTerms``; :mod:`~mixtune.losses.base`: the contract between the loop and a loss;
- :mod:`~mixtune.losses.logits`: model + batch -> per-token NLL, with the full logits or in
  chunks that never hold them (``train.logits``);
- :mod:`~mixtune.losses.sft`, :mod:`~mixtune.losses.dft`, :mod:`~mixtune.losses.cadft` (with
  :mod:`~mixtune.losses.rewrite`, CADFT's rewriting, and :mod:`~mixtune.losses.generation`,
  the new targets it writes): one module per loss, one line each in
  :data:`mixtune.registry.LOSSES`.
"""
