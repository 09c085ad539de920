"""A conversion's size (tsvd/sizes.py): exactly one of rank / energy / params_ratio / budget, each valid —
the one rule behind ``SpectralLinear.from_linear``, ``spectralize`` and ``tsvd convert``."""

import pytest

from tsvd.errors import UserError
from tsvd.sizes import check_positive_int, check_size

ALL = "give exactly one of rank=, energy=, params_ratio= or budget="


@pytest.mark.parametrize(
    "sizes, name",
    [(dict(rank=3), "rank"), (dict(energy=0.9), "energy"), (dict(energy=1), "energy"),
     (dict(params_ratio=0.5), "params_ratio"), (dict(budget=10), "budget")],
)
def test_one_valid_size_is_named(sizes, name):
    assert check_size(**{"rank": None, "energy": None, "params_ratio": None, "budget": None, **sizes}) == name


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(rank=None, energy=None, params_ratio=None, budget=None), ALL),
        (dict(rank=2, energy=0.9, params_ratio=None, budget=None), ALL),
        (dict(rank=None, energy=None, params_ratio=0.5, budget=100), ALL),
        (dict(rank=None, energy=None), "give exactly one of rank= or energy="),  # the names the caller offers
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=-3), "rank must be a positive integer, got -3"),
        (dict(rank=2.0), "rank must be a positive integer, got 2.0"),
        (dict(rank=True), "rank must be a positive integer, got True"),
        (dict(budget=0), "budget must be a positive integer, got 0"),
        (dict(budget="1000"), "budget must be a positive integer, got '1000'"),
        (dict(energy=0.0), "energy must be a number in (0, 1], got 0.0"),
        (dict(energy=1.5), "energy must be a number in (0, 1], got 1.5"),
        (dict(energy=-0.1), "energy must be a number in (0, 1], got -0.1"),
        (dict(params_ratio=0.0), "params ratio must be a number in (0, 1], got 0.0"),
        (dict(params_ratio=1.5), "params ratio must be a number in (0, 1], got 1.5"),
    ],
)
def test_bad_sizes_are_one_line_user_errors(sizes, message):
    with pytest.raises(UserError) as e:
        check_size(**sizes)
    assert str(e.value) == message


def test_positive_int_and_unknown_size_names():
    assert check_positive_int(5, "calibration tokens") == 5
    with pytest.raises(UserError, match="calibration tokens must be a positive integer, got 0"):
        check_positive_int(0, "calibration tokens")
    with pytest.raises(TypeError, match="unknown sizes"):
        check_size(ranks=3)  # a caller's typo is a programming error, not a user's

