"""The contract every registered mixer keeps, checked without a model.

Parametrised over ``MIXERS``: a new mixer is covered as soon as it is registered. A mixer that
needs options gets them from ``TEST_OPTIONS`` (every mixer needs an entry, ``{}`` for none).
The context is fake but deterministic: every callable returns numbers that depend only on
(step, dataset, current weights), so two runs given the same history see the same numbers.

Example-config rule: every mixer has an example under ``configs/``, named after the mixer
(``configs/<name>.yaml``) or, for mixers sharing one module, after the module
(``configs/static.yaml`` covers uniform, proportional, temperature and fixed); a shared example
must name every mixer of its module.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.config import MethodConfig
from mixtune.mixers import DatasetInfo, DomainInfo, LookaheadResult, MixContext
from mixtune.registry import MIXERS
from mixtune.simplex import validate

CONFIGS = Path(__file__).parent.parent / "configs"
MAX_STEPS = 48

# Small, fast options per mixer (update often, so a short fake run exercises every path).
TEST_OPTIONS: dict[str, dict] = {
    "uniform": {},
    "proportional": {},
    "temperature": {"tau": 2.0},
    "fixed": {"weights": {"a": 2, "b": 1}},
    "dynamixsft": {"update_every": 4},
    "exp3": {"update_every": 2, "warmup_steps": 4},
    "dynamics": {"schedule": "fixed", "interval": 8, "c_max": 4, "probe_batches": 1},
    "proxymix": {"policy": "loss_increase", "decisions": 6},
}

DATASETS = [DatasetInfo("a", 300, 9000), DatasetInfo("b", 100, 1000), DatasetInfo("c", 50, 4000)]
DOMAINS = [
    DomainInfo("a", "target", "loss", None),
    DomainInfo("b", "constraint", "loss", 2.0),
    DomainInfo("c", "monitor", "accuracy", None),
]


def _options(name: str) -> dict:
    if name not in TEST_OPTIONS:
        pytest.fail(
            f"mixer '{name}' has no entry in TEST_OPTIONS of tests/test_mixer_contract.py;"
            " add one (its small test options, or {} if it takes none)"
        )
    return TEST_OPTIONS[name]


def _build(name: str, seed: int = 0):
    options = MIXERS.options(MethodConfig(name, dict(_options(name))), "mixer")
    return MIXERS[name](options, list(DATASETS), list(DOMAINS), seed)


def _fake_ctx(step: int, weights: np.ndarray, logged: dict) -> MixContext:
    """Deterministic stand-ins for the trainer's callables (depend on step, dataset, weights)."""
    K = len(DATASETS)
    phase = (step % 7) / 7.0
    w = np.asarray(weights, np.float64)

    def evaluate(n_batches=None, accuracy=True, per_example=False, use_cache=True):
        return {
            d.name: {
                "loss": 2.0 + 0.3 * i - 0.2 * w[i % K] + 0.05 * phase,
                "accuracy": 0.2 + 0.1 * i + 0.1 * w[i % K],
            }
            for i, d in enumerate(DOMAINS)
        }

    def probe(j, steps, n_batches=None, accuracy=False, per_example=False):
        base = evaluate()
        return {
            d: {
                "loss": m["loss"] - 0.01 * steps * (1 + j + i) * (1 if i == j else -0.3),
                "accuracy": m["accuracy"],
            }
            for i, (d, m) in enumerate(base.items())
        }

    def losses(j, batch_size=None, key=None):
        n = batch_size or 4
        k = step if key is None else key
        return 2.0 + 0.1 * j + 0.05 * np.arange(n) - 0.001 * k * (j + 1) - 0.1 * w[j]

    def lookahead(j, optimizer="sgd", batch_size=None, key=None):
        pre = losses(j, batch_size, key)
        drop = 0.01 * (1 + j) * (1.5 + np.sin(step + j)) * (2 if optimizer == "adam" else 1)
        return LookaheadResult(pre, pre - drop, seconds=0.0)

    return MixContext(
        step=step,
        max_steps=MAX_STEPS,
        datasets=list(DATASETS),
        domains=list(DOMAINS),
        weights=w.copy(),
        train_losses={
            d.name: 1.0 + 0.4 * i + 0.1 * phase - 0.3 * w[i] for i, d in enumerate(DATASETS)
        },
        evaluate=evaluate,
        probe=probe,
        lookahead=lookahead,
        log=logged.__setitem__,
        losses=losses,
    )


def _drive(mixer, steps: list[int], weights: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Ask ``mixer`` at ``steps`` as the loop would; returns its proposals and the last weights."""
    out = []
    for step in steps:
        logged: dict = {}
        w = validate(mixer.propose(_fake_ctx(step, weights, logged)), [d.name for d in DATASETS])
        out.append(w)
        weights = w
    return out, weights


def _schedule(mixer) -> list[int]:
    return sorted(set(mixer.update_steps(MAX_STEPS)) | {0})


NAMES = sorted(MIXERS)


@pytest.mark.parametrize("name", NAMES)
def test_update_steps_are_valid(name):
    steps = list(_build(name).update_steps(MAX_STEPS))
    assert all(isinstance(s, (int, np.integer)) and 0 <= s < MAX_STEPS for s in steps), steps


@pytest.mark.parametrize("name", NAMES)
def test_weights_on_the_simplex(name):
    mixer = _build(name)
    start = np.full(len(DATASETS), 1 / len(DATASETS))
    proposals, _ = _drive(mixer, _schedule(mixer), start)
    for w in proposals:
        assert w.shape == (len(DATASETS),)
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        assert abs(w.sum() - 1) < 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_the_seed(name):
    start = np.full(len(DATASETS), 1 / len(DATASETS))
    a, _ = _drive(_build(name, seed=3), _schedule(_build(name)), start)
    b, _ = _drive(_build(name, seed=3), _schedule(_build(name)), start)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name):
    start = np.full(len(DATASETS), 1 / len(DATASETS))
    steps = _schedule(_build(name))
    half = len(steps) // 2
    full, _ = _drive(_build(name, seed=1), steps, start)

    first = _build(name, seed=1)
    _, weights = _drive(first, steps[:half], start)
    buf = io.BytesIO()  # through torch.save/load, as the checkpoint stores it
    torch.save(copy.deepcopy(first.state_dict()), buf)
    buf.seek(0)
    resumed = _build(name, seed=1)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    rest, _ = _drive(resumed, steps[half:], weights)
    assert len(rest) == len(full) - half
    for x, y in zip(full[half:], rest):
        assert np.array_equal(x, y), f"{name}: resumed weights differ from uninterrupted ones"


@pytest.mark.parametrize("name", NAMES)
def test_every_mixer_has_an_example_config(name):
    module = MIXERS[name].__module__.rsplit(".", 1)[-1]
    own, shared = CONFIGS / f"{name}.yaml", CONFIGS / f"{module}.yaml"
    path = own if own.is_file() else shared
    assert path.is_file(), (
        f"mixer '{name}' needs an example config: configs/{name}.yaml "
        f"(or configs/{module}.yaml shared with its module)"
    )
    if "stages:" in path.read_text():  # a continual config (ProxyMix) has its own schema
        from mixtune.mixers.proxymix.setting import load as load_continual

        cfg = load_continual(path)
    else:
        cfg = config.load(path)
    assert MIXERS[cfg.mixer.name].__module__ == MIXERS[name].__module__
    assert name in path.read_text(), f"{path.name} must mention mixer '{name}'"


def test_a_missing_test_options_entry_fails_loudly(monkeypatch):
    monkeypatch.setitem(MIXERS, "brand_new", MIXERS["uniform"])
    with pytest.raises(pytest.fail.Exception, match="add one"):
        _options("brand_new")
