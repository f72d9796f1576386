"""The golden runs (bench/golden.py): every example config, cut to a few steps, still gives the
bit-identical metrics and parameters recorded in bench/results/golden.json.

Slow (about two minutes) and tied to the machine and torch build the record was made on, so it
is run by hand around refactors: ``python -m pytest -m slow tests/test_golden.py``.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_golden_runs_are_bit_identical():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/golden.py"), "check"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
