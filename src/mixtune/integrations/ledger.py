"""Per-dataset training losses under a Hugging Face ``Trainer``, read off the model's forwards.

A HF ``Trainer`` reports one loss per logging step, not one per dataset. The mixture knows
which dataset every row of every global batch came from (:meth:`MixtureDataset.batch`), so a
forward hook on the model reads each training micro-batch's logits and labels and credits the
token losses to the datasets of its rows. The sums stay on the device and are all-reduced and
read (one host sync) only when a mixer update or a checkpoint needs them.

The ledger assumes one model forward per training micro-batch, in order (the gradient
accumulation micro-batches of a step, then those of the next), unpacked batches (no TRL packing
or padding-free batches), and labels passed to the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mixtune.errors import MixtuneError
from mixtune.integrations.dataset import MixtureDataset
from mixtune.losses.core import token_losses


class LossLedger:
    """Token-loss sums per dataset of ``mix``'s training micro-batches."""

    def __init__(self, mix: MixtureDataset):
        self.mix = mix
        self.sums = np.zeros((len(mix.names), 2))  # per-dataset (NLL sum, tokens) since a take
        self.paused = False  # forwards that are not training micro-batches (look-aheads)
        self._dev: torch.Tensor | None = None  # the same, on the device, since the last pull
        self._hook = None

    def attach(self, model, first: int, micro: int, ga: int, world: int, rank: int) -> None:
        """Hook ``model``; its next training forward is micro-batch 0 of global batch
        ``first``, each rank doing ``micro`` rows ``ga`` times per optimizer step."""
        self.first, self.micro, self.ga, self.world, self.rank = first, micro, ga, world, rank
        self.forwards = 0
        device = next(model.parameters()).device
        self._dev = torch.zeros(len(self.mix.names), 2, dtype=torch.float64, device=device)
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module, args, kwargs, output):
        """Forward hook: credit a training micro-batch's token losses to its datasets."""
        if self.paused or not (module.training and torch.is_grad_enabled()):
            return
        labels, logits = kwargs.get("labels"), getattr(output, "logits", None)
        fused = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if labels is None or (logits is None and fused[0] is None):
            raise MixtuneError(
                "MixtureCallback: per-dataset losses need the model called with "
                "labels= and returning logits (or TRL's fused log_probs); "
                "or track_losses=False"
            )
        m = self.forwards
        self.forwards += 1
        ds, _ = self.mix.batch(self.first + m // self.ga)
        lo = ((m % self.ga) * self.world + self.rank) * self.micro
        rows = torch.as_tensor(ds[lo : lo + self.micro], device=self._dev.device)
        if len(rows) != labels.shape[0]:
            raise MixtuneError(
                f"MixtureCallback: a training micro-batch has {labels.shape[0]} "
                f"rows, expected {len(rows)} (packing / padding-free batches "
                "are not supported)"
            )
        with torch.no_grad():
            if logits is not None:
                nll, mask = token_losses(logits.detach(), labels)
            else:  # TRL's fused head: log p(label) per position, 0 where ignored
                nll, mask = -fused[0].detach().float(), fused[1]
            self._dev[:, 0].index_add_(0, rows, (nll * mask).sum(-1).double())
            self._dev[:, 1].index_add_(0, rows, mask.sum(-1).double())

    def pull(self) -> None:
        """Move the device sums, summed over ranks, into :attr:`sums` (every rank calls it)."""
        if self._dev is None:
            return
        sums = self._dev
        if self.world > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        self.sums += sums.cpu().numpy()  # host sync: update and save steps only
        self._dev.zero_()

    def take(self) -> dict[str, float]:
        """Mean token loss per dataset since the last take (datasets trained on since)."""
        self.pull()
        out = {n: float(s / t) for n, (s, t) in zip(self.mix.names, self.sums) if t > 0}
        self.sums[:] = 0
        return out
