"""How much of a weight a conversion keeps: exactly one size, and a valid one.

The sizes: ``rank`` (every layer, a positive integer), ``energy`` (per layer, the fraction of ``Σ sᵢ²``
kept, in (0, 1]), ``params_ratio`` (the targeted layers' factors hold this fraction of their dense
parameters, in (0, 1]) and ``budget`` (that many parameters, a positive integer). One rule for
``SpectralLinear.from_linear`` (rank or energy), ``spectralize`` and ``tsvd convert`` (all four).
"""

from __future__ import annotations

from tsvd.allocation import check_ratio
from tsvd.errors import UserError
from tsvd.spectrum import check_energy

SIZES = ("rank", "energy", "params_ratio", "budget")


def check_positive_int(value: object, what: str) -> int:
    """``value`` is an integer ≥ 1 (not a bool); returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_size(**sizes: object) -> str:
    """Exactly one of ``sizes`` (the sizes a caller offers, name → value or ``None``) is given, and it is
    valid; returns its name. The message lists the offered names: ``give exactly one of rank= or energy=``."""
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise TypeError(f"check_size: unknown sizes {sorted(unknown)} (known: {SIZES})")
    given = [name for name, value in sizes.items() if value is not None]
    if len(given) != 1:
        names = [f"{name}=" for name in sizes]
        raise UserError(f"give exactly one of {', '.join(names[:-1])} or {names[-1]}")
    name = given[0]
    if name == "energy":
        check_energy(sizes[name])
    elif name == "params_ratio":
        check_ratio(sizes[name])
    else:
        check_positive_int(sizes[name], name)
    return name
