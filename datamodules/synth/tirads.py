"""ACR TI-RADS (Tessler et al., JACR 2017): the points of each descriptor, and the level by the ACR rule.

The synthetic nodule descriptors (composition with anechoic cystic parts, echogenicity, taller-than-wide,
margin, echogenic foci that can sum) map one-to-one onto these points; metadata.csv carries them in its
``ti-rads_*`` columns.
"""

from __future__ import annotations

from collections.abc import Iterable

# ACR TI-RADS points (Tessler et al., JACR 2017).
COMPOSITION = {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2}
ECHOGENICITY = {"anechoic": 0, "hyperechoic": 1, "isoechoic": 1, "hypoechoic": 2, "very hypoechoic": 3}
MARGIN = {"smooth": 0, "ill-defined": 0, "lobulated": 2, "irregular": 2, "extrathyroidal": 3}
FOCI = {"comet-tail": 0, "macro": 1, "rim": 2, "punctate": 3}
SHAPE_TALLER = 3


def tirads_points(
    composition: str, echogenicity: str, taller: bool, margin: str, foci: Iterable[str]
) -> dict[str, int]:
    """ACR TI-RADS points of each descriptor (the metadata.csv ``ti-rads_*`` columns)."""
    return {
        "composition": COMPOSITION[composition],
        "echogenicity": ECHOGENICITY[echogenicity],
        "shape": SHAPE_TALLER if taller else 0,
        "margin": MARGIN[margin],
        "echogenicfoci": sum(FOCI[f] for f in foci),
    }


def acr_level(points: int) -> int:
    """ACR TI-RADS level from the points total: 0 -> TR1, 2 -> TR2, 3 -> TR3, 4-6 -> TR4, >= 7 -> TR5.

    A total of 1 (only possible for a spongiform, iso-echoic nodule, which ACR says gets no further points)
    is TR1.
    """
    if points <= 1:
        return 1
    if points <= 3:
        return points
    return 4 if points <= 6 else 5
