"""When DynaMiCS updates: the paper's update sets, scaled to the run, and the horizon H_t.

The paper (Gualdoni et al. 2026) trains 2048 steps and updates at geometric sets of steps that
all include step 0. mixtune scales each step by ``max_steps / 2048``, rounds, and merges
duplicates (for 256 steps, ``no_warmup`` is {0, 8, 16, 32, 64, 128}); ``fixed`` updates every
``interval`` steps. H_t, the gap from an update to the next one (or to the end of the run), is
both the horizon of the predictions and the longest useful probe.
"""

from __future__ import annotations

from mixtune.mixers.base import Steps

# The paper's update sets for a 2048-step run (all include step 0).
SCHEDULES = {
    "no_warmup": [0] + [64 * 2**k for k in range(5)],  # 0, 64, 128, ..., 1024
    "light_warmup": [0] + [8 * 2**k for k in range(8)],  # 0, 8, 16, ..., 1024
    "dense_warmup": [0] + [2 * 2**k for k in range(10)],  # 0, 2, 4, ..., 1024
}
PAPER_STEPS = 2048


def schedule_steps(kind: str, max_steps: int, interval: int = 128) -> Steps:
    """Update steps for a run of ``max_steps`` (0 first; every step < max_steps), lazily."""
    if kind == "fixed":
        return Steps.every(interval, max_steps)
    scaled = {0} | {max(1, round(s * max_steps / PAPER_STEPS)) for s in SCHEDULES[kind][1:]}
    return Steps(s for s in scaled if s < max_steps)


def horizon(steps, step: int, max_steps: int) -> int:
    """H_t: steps until the next update, or until the end of the run."""
    if not isinstance(steps, Steps):
        steps = Steps(steps)
    nxt = steps.after(step)
    return (max_steps if nxt is None else nxt) - step
