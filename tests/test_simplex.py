import numpy as np
import pytest

from mixtune import simplex
from mixtune.errors import MixtuneError


def test_validate_accepts_mapping_and_orders_by_name():
    w = simplex.validate({"b": 0.25, "a": 0.75}, ["a", "b"])
    np.testing.assert_allclose(w, [0.75, 0.25])


@pytest.mark.parametrize(
    "bad,msg",
    [
        ([0.5, float("nan")], "finite"),
        ([1.5, -0.5], "non-negative"),
        ([0.5, 0.2], "sum to 1"),
        ({"zz": 1.0}, "unknown dataset"),
        ([1.0], "1 weights for 2 datasets"),
    ],
)
def test_validate_rejects(bad, msg):
    with pytest.raises(MixtuneError, match=msg):
        simplex.validate(bad, ["a", "b"])


def test_normalize_ratios():
    np.testing.assert_allclose(simplex.normalize({"a": 2, "b": 1}, ["a", "b"]), [2 / 3, 1 / 3])
