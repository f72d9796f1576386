"""fp16 mixed precision (``train.mixed_precision: fp16``): float16 autocast over fp32 master
weights with dynamic loss scaling, HF Trainer's ``fp16=True``.

float16 has 5 exponent bits: activation gradients below about 6e-8 flush to zero in the
backward. Multiplying the loss by a large scale S lifts them into range; the fp32 gradients
are divided by S again before clipping, so the update is the unscaled one. A scale too large
overflows some gradient to inf: that step is skipped (no optimizer or LR-schedule step) and
S halved; after ``growth_interval`` clean steps in a row S doubles again (torch.amp.GradScaler's
rule and defaults). Powers of two, so scaling and unscaling are exact.

Why mixtune's own scaler rather than accelerate's or ``torch.amp.GradScaler``:

1. accelerate enables fp16 on GPUs only; on a CPU ``mixed_precision="fp16"`` silently trains
   in fp32. torch's CPU autocast supports float16, so one code path serves both.
2. The overflow decision must be the same on every rank. Under FSDP2 each rank holds a shard of
   the gradients, and GradScaler's per-rank inf check would disagree; the step already computes
   the *global* gradient norm (one host sync), and a non-finite norm is an overflow on every
   rank at once (tests/test_fp16_distributed.py forces an inf into one rank's shard).
3. Its state is two numbers, saved in ``state.json`` with every checkpoint and copied by
   probes' and look-aheads' snapshots (:mod:`mixtune.engine.snapshot`), so resumes and branch
   runs stay exact.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class LossScaler:
    """Dynamic loss scale: ``scale`` the loss, ``unscale_`` the gradients, then ``update`` after
    a clean step or ``backoff`` after an overflow."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # clean steps since the scale last changed

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params) -> None:
        """Divide every gradient by the scale, in place (before clipping and the norm)."""
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def update(self) -> None:
        """After a step whose gradients were finite: grow after ``growth_interval`` of them."""
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def backoff(self) -> None:
        """After an overflow (the step is skipped): a smaller scale for the next one."""
        self.scale *= self.backoff_factor
        self.good_steps = 0

    def state_dict(self) -> dict:
        """JSON-ready: a checkpoint's ``state.json`` holds it."""
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["loss_scale"])
        self.good_steps = int(state["loss_scale_good_steps"])


def fp16_autocast_works(device: torch.device) -> bool:
    """Whether ``device`` runs a matmul under float16 autocast (torch >= 2.3 on CPUs, CUDA)."""
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, ValueError, TypeError):
        return False
    return out.dtype == torch.float16


def setup(acc, mixed_precision: str) -> LossScaler | None:
    """The run's loss scaler under ``train.mixed_precision: fp16`` (None otherwise).

    accelerate is built with ``mixed_precision="no"`` for fp16
    (:func:`mixtune.engine.build.pick_mixed_precision`); this gives ``acc.autocast()`` -- what
    the step, probes, look-aheads and loss hooks enter -- float16 autocast on ``acc.device``. A
    device without float16 autocast trains in fp32, with a warning.
    """
    if mixed_precision != "fp16":
        return None
    device = torch.device(acc.device)
    if not fp16_autocast_works(device):
        log.warning(
            "train.mixed_precision=fp16: %s has no float16 autocast; training in fp32 "
            "(set train.mixed_precision=fp32 or bf16 to silence this)",
            device,
        )
        return None
    acc.autocast = lambda *args, **kwargs: torch.autocast(device.type, dtype=torch.float16)
    return LossScaler()
