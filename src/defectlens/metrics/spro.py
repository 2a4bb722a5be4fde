"""sPRO, the saturated per-region overlap of MVTec LOCO AD (Bergmann et al., IJCV 2022), as the
dataset's official evaluation computes it.

Every annotated defect region (in LOCO, one mask file of an image; an image may have several)
has a saturation area s, in pixels: flagging s of its pixels earns full credit, so a missing part
marked by its whole compartment counts as found once a fair share of it lights up. At a threshold
t a region's saturated overlap is min(1, pixels >= t in the region / s), and sPRO(t) is the mean
over all regions. A false positive is a flagged pixel that lies outside every region of its
image, in every evaluated image, good or anomalous; the false-positive rate divides their count
by the number of such defect-free pixels over all images (the official script's
``get_fp_areas_for_thresholds`` and ``get_fp_rates``). AUC-sPRO is the area under sPRO over FPR
from 0 to a limit (0.05 and 0.3 in the LOCO paper), divided by the limit.

The curve is exact, through every distinct score (see metrics.pixel), where the official script
samples a fixed number of thresholds; its curve converges to this one as the sample grows.
Sorted by score, a region's j-th pixel raises its overlap by (min(j, s) - min(j-1, s)) / s, so
sPRO is a weighted count of defect pixels at or above the threshold, and tied pixels get the
same total whatever their order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectlens.metrics.pixel import _area_up_to, _scores, weighted_curve


@dataclass(frozen=True)
class DefectRegion:
    """One annotated defect of an image: its pixels and how many of them saturate the overlap."""

    mask: np.ndarray  # bool H×W
    saturation: float  # pixels


def saturation_area(area: float, config: dict, scale: float = 1.0) -> float:
    """The saturation area of a region of ``area`` pixels under its defects_config.json entry.

    ``relative_saturation``: a share of the region's own area; otherwise an absolute pixel count,
    capped at the region's area (a region smaller than the count saturates when fully flagged).
    ``scale`` converts absolute counts when masks are evaluated at another resolution (the ratio
    of pixel areas, evaluated / original).
    """
    threshold = float(config["saturation_threshold"])
    if config.get("relative_saturation", False):
        return threshold * area
    return min(threshold * scale, float(area))


def defect_regions(mask_values: np.ndarray, defects_config: list[dict], scale: float = 1.0) -> list[DefectRegion]:
    """The regions of one LOCO mask file (uint8, 0 = background, the defect's pixel value inside).

    The pixel value picks the defects_config entry; an empty mask gives no region.
    """
    by_value = {int(entry["pixel_value"]): entry for entry in defects_config}
    regions = []
    for value in np.unique(mask_values[mask_values > 0]):
        if int(value) not in by_value:
            raise ValueError(f"mask pixel value {int(value)} is not in the defects config "
                             f"(known: {', '.join(str(v) for v in sorted(by_value))})")
        mask = mask_values == value
        regions.append(DefectRegion(mask, saturation_area(float(mask.sum()), by_value[int(value)], scale)))
    return regions


def spro_curve(regions_per_image: list[list[DefectRegion]], maps) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, sPRO) through every distinct threshold, from the highest down. Images with no
    regions are anomaly-free; the pixels outside all regions of every image are the negatives.
    None when there is no region or no defect-free pixel."""
    regions_per_image, maps = list(regions_per_image), list(maps)
    if len(regions_per_image) != len(maps):
        raise ValueError(f"{len(regions_per_image)} region lists but {len(maps)} maps")
    scores, weights, negatives, count = [], [], [], 0
    for index, (regions, score_map) in enumerate(zip(regions_per_image, maps)):
        score_map = _scores(score_map)
        if score_map.ndim != 2:
            raise ValueError(f"map {index} has shape {score_map.shape}, expected H×W")
        defective = np.zeros(score_map.shape, dtype=bool)
        for region in regions:
            if region.mask.shape != score_map.shape:
                raise ValueError(f"a region of image {index} is {region.mask.shape} but its map is {score_map.shape}")
            # A region that earns no credit (no saturation area) still keeps its pixels out of
            # the false positives, as in the official union over all of an image's channels.
            defective |= region.mask
            if region.saturation <= 0 or not region.mask.any():
                continue
            ranked = np.sort(score_map[region.mask])[::-1]
            rank = np.arange(1, ranked.size + 1)
            gain = np.minimum(rank, region.saturation) - np.minimum(rank - 1, region.saturation)
            scores.append(ranked)
            weights.append(gain / region.saturation)
            count += 1
        negatives.append((defective if defective.any() else None, score_map))
    if not count:
        return None
    return weighted_curve(np.concatenate(scores), np.concatenate(weights), negatives, total_weight=count)


def au_spro(regions_per_image: list[list[DefectRegion]], maps, fpr_limit: float = 0.05) -> float:
    """Area under sPRO over FPR in [0, ``fpr_limit``], divided by ``fpr_limit``: 1 for a map that
    saturates every region before any defect-free pixel is flagged; nan when undefined."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], not {fpr_limit}")
    curve = spro_curve(regions_per_image, maps)
    return float("nan") if curve is None else _area_up_to(*curve, fpr_limit) / fpr_limit
