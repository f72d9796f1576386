"""Update schedules are lazy: ``max_steps`` may be 10**12 without allocating per step.

Every registered mixer's ``update_steps(10**12)`` must come back at once, in O(1) memory, with
the right membership; the loop only asks ``step in ...``. A memory ceiling (RLIMIT_AS) turns a
regression (materialising ~10**10 ints) into a quick MemoryError instead of an OOM kill.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
import tracemalloc

import numpy as np
import pytest

from mixtune import config
from mixtune.config import MethodConfig
from mixtune.engine.loop import Trainer
from mixtune.mixers import DatasetInfo, DomainInfo, Steps
from mixtune.mixers.dynamics.schedule import PAPER_STEPS, SCHEDULES, horizon
from mixtune.registry import MIXERS

HUGE = 10**12
DATASETS = [DatasetInfo("a", 300, 9000), DatasetInfo("b", 100, 1000)]
DOMAINS = [DomainInfo("a", "target", "loss", None), DomainInfo("b", "constraint", "loss", 2.0)]

# (mixer, options, expected interval or None for an explicit set)
CASES = [
    ("uniform", {}, None),
    ("proportional", {}, None),
    ("temperature", {"tau": 2.0}, None),
    ("fixed", {"weights": {"a": 2, "b": 1}}, None),
    ("exp3", {}, 10),
    ("exp3", {"update_every": 7}, 7),
    ("dynamixsft", {}, 50),
    ("dynamixsft", {"update_every": 3}, 3),
    ("dynamics", {"schedule": "fixed", "interval": 128}, 128),
    ("dynamics", {"schedule": "no_warmup"}, None),
    ("dynamics", {"schedule": "light_warmup"}, None),
    ("dynamics", {"schedule": "dense_warmup"}, None),
    ("proxymix", {"policy": "loss_increase"}, None),
    ("proxymix", {"policy": "loss_increase", "update_every": 1000}, 1000),
]


def _build(name: str, options: dict):
    opts = MIXERS.options(MethodConfig(name, dict(options)), "mixer")
    return MIXERS[name](opts, list(DATASETS), list(DOMAINS), 0)


@contextlib.contextmanager
def _memory_ceiling(extra: int = 1 << 30):
    """Cap this process's address space at its current size + ``extra`` bytes, then restore."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + extra if hard == resource.RLIM_INFINITY else min(hard, size + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_every_mixer_is_covered():
    assert {name for name, _, _ in CASES} == set(MIXERS)


@pytest.mark.parametrize(
    "name,options,interval", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]
)
def test_huge_max_steps_is_lazy(name, options, interval):
    mixer = _build(name, options)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with _memory_ceiling():
            steps = mixer.update_steps(HUGE)
            member = {s: s in steps for s in (0, 1, interval or 2, HUGE - 1, HUGE, -1)}
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 1 << 20, f"{name}: {peak} bytes for update_steps({HUGE})"
    assert member[0] and not member[HUGE] and not member[-1]
    if interval is not None:
        assert member[interval] and (interval == 1 or not member[1])
        last = (HUGE - 1) // interval * interval
        assert last in steps and np.int64(last) in steps and last + 1 not in steps
        assert len(steps) == -(-HUGE // interval)
        assert horizon(steps, last - 1, HUGE) == 1 and horizon(steps, last, HUGE) == HUGE - last
    else:  # a short explicit set: small enough to list
        assert len(steps) <= 64 and all(0 <= s < HUGE for s in steps)
    if name == "dynamics" and options["schedule"] != "fixed":
        want = {round(s * HUGE / PAPER_STEPS) for s in SCHEDULES[options["schedule"]]}
        assert list(steps) == sorted(want)
        assert all(s in steps and s + 1 not in steps for s in want)


@pytest.mark.parametrize(
    "name,options,interval", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]
)
@pytest.mark.parametrize("max_steps", [1, 7, 100, 2048])
def test_membership_matches_iteration_on_small_runs(name, options, interval, max_steps):
    steps = _build(name, options).update_steps(max_steps)
    listed = list(steps)
    assert listed == sorted(set(listed)) and listed[0] == 0 and listed[-1] < max_steps
    assert [t for t in range(-2, max_steps + 3) if t in steps] == listed
    for t in range(max_steps):  # the next update (DynaMiCS's horizon) agrees with the list
        later = [s for s in listed if s > t]
        assert horizon(steps, t, max_steps) == (later[0] if later else max_steps) - t


def test_steps_container():
    s = Steps.every(5, 23)
    assert s == [0, 5, 10, 15, 20] and [0, 5, 10, 15, 20] == s and s == range(0, 25, 5)
    assert s != [0, 5, 10] and 5.0 not in s and "5" not in s and np.int32(15) in s
    assert [s.after(t) for t in (-3, 0, 4, 5, 19, 20, 99)] == [0, 5, 5, 10, 20, None, None]
    e = Steps([8, 0, 3, 3])
    assert e == [0, 3, 8] and 3 in e and 4 not in e and np.int64(8) in e
    assert [e.after(t) for t in (-1, 0, 3, 7, 8)] == [0, 3, 8, 8, None]
    assert Steps.every(3, 0) == [] and Steps.every(3, 0).after(0) is None
    with pytest.raises(ValueError):
        Steps(range(0, 10, -1))


def test_trainer_starts_with_huge_max_steps(make_config, tmp_path):
    """max_steps=10**12 with EXP3 validates, builds (LR schedule included) and trains a step."""
    raw = make_config(max_steps=HUGE, mixer={"name": "exp3", "update_every": 1})
    raw["train"].update(schedule="cosine", warmup_ratio=0.01)
    with _memory_ceiling(2 << 30):
        trainer = Trainer(config.load(data=raw))
        out = trainer.run(stop_after=1)
    assert out["stopped"] and out["steps"] == 1
    assert trainer.scheduler.get_last_lr()[0] > 0
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records][:2] == [0, 1] and "mixer" in records[1]
