"""The Visual Decathlon score (Rebuffi et al., "Learning multiple visual domains with residual adapters",
NIPS 2017, Sec. 5; used in Table 1 of "Efficient parametrization of multi-domain deep neural networks",
CVPR 2018).

Sketch::

    S = sum_d alpha_d * max(0, E_d^max - E_d) ** gamma
    gamma = 2,  E_d^max = 2 x the baseline's test error on d,  alpha_d = 1000 * (E_d^max) ** -gamma

so a domain scores 1000 at zero error, 250 at the baseline's error and 0 at twice the baseline's error or
worse; the score rewards doing well on every domain rather than on average. Errors may be percentages or
fractions (the same unit for the method and the baseline): the score does not depend on the unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from virtnet.errors import ConfigError


@dataclass(frozen=True)
class DecathlonScore:
    """A decathlon score: the total and each domain's share."""

    total: float
    per_domain: dict[str, float]


def decathlon_score(
    errors: Mapping[str, float],
    baseline_errors: Mapping[str, float],
    gamma: float = 2.0,
    scale: float = 1000.0,
) -> DecathlonScore:
    """``S = sum_d alpha_d * max(0, E_d^max - E_d) ** gamma`` over the domains of ``errors``.

    Args:
        errors: the method's test error per domain.
        baseline_errors: the baseline's test error per domain (same unit); ``E_d^max`` is twice it.
        gamma: the exponent (2 in the decathlon).
        scale: the score of a domain at zero error (1000).

    Raises:
        ConfigError: a domain without a baseline error, a baseline error that is not positive, or a
            negative error.
    """
    if not errors:
        raise ConfigError("decathlon score: no domain to score")
    per: dict[str, float] = {}
    for d, e in errors.items():
        if d not in baseline_errors:
            raise ConfigError(
                f"decathlon score: no baseline error for domain '{d}' (have {sorted(baseline_errors)})"
            )
        base = float(baseline_errors[d])
        if base <= 0:
            raise ConfigError(f"decathlon score: the baseline error of '{d}' is {base}; it must be > 0")
        if e < 0:
            raise ConfigError(f"decathlon score: the error of '{d}' is {e}; errors are >= 0")
        e_max = 2.0 * base
        alpha = scale * e_max**-gamma
        per[d] = alpha * max(0.0, e_max - float(e)) ** gamma
    return DecathlonScore(sum(per.values()), per)


__all__ = ["DecathlonScore", "decathlon_score"]
