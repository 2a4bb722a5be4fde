"""Anomaly detection metrics: image level (AUROC, AUPR, F1-max), pixel level (pixel AUROC,
AU-PRO), and :func:`evaluate`, which reports them overall and per defect type."""

from __future__ import annotations

import numpy as np

from defectlens.metrics.image import f1_max, image_aupr, image_auroc
from defectlens.metrics.pixel import au_pro, pixel_auroc

__all__ = ["au_pro", "evaluate", "f1_max", "image_aupr", "image_auroc", "pixel_auroc"]


def evaluate(labels, scores, defect_types, masks=None, maps=None,
             fpr_limit: float = 0.3) -> dict[str, dict[str, float | int]]:
    """Metrics for all images (key ``"all"``) and for each defect type.

    ``labels`` are truthy for anomalous images; ``defect_types`` names each image's type
    (whatever normal images carry is ignored). A type's block uses that type's anomalous
    images plus all normal images, as in the MVTec AD per-type tables. Each block holds
    n_normal, n_anomalous, image_auroc, image_aupr, f1_max, f1_threshold, and, when masks and
    maps are given, pixel_auroc and au_pro (masks of normal images may be None).
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    defect_types = np.asarray(defect_types, dtype=object).ravel()
    if not labels.size == scores.size == defect_types.size:
        raise ValueError(f"{labels.size} labels, {scores.size} scores and "
                         f"{defect_types.size} defect types")
    if (masks is None) != (maps is None):
        raise ValueError("pixel metrics need both masks and maps")
    if masks is not None and not len(masks) == len(maps) == labels.size:
        raise ValueError(f"{labels.size} images but {len(masks)} masks and {len(maps)} maps")
    types = sorted(set(defect_types[labels]))
    if "all" in types:
        raise ValueError('"all" is reserved for the overall block; rename that defect type')

    def block(selected: np.ndarray) -> dict[str, float | int]:
        f1, threshold = f1_max(labels[selected], scores[selected])
        result = {
            "n_normal": int((~labels[selected]).sum()),
            "n_anomalous": int(labels[selected].sum()),
            "image_auroc": image_auroc(labels[selected], scores[selected]),
            "image_aupr": image_aupr(labels[selected], scores[selected]),
            "f1_max": f1,
            "f1_threshold": threshold,
        }
        if masks is not None:
            indices = np.flatnonzero(selected)
            chosen_masks = [masks[i] for i in indices]
            chosen_maps = [maps[i] for i in indices]
            result["pixel_auroc"] = pixel_auroc(chosen_masks, chosen_maps)
            result["au_pro"] = au_pro(chosen_masks, chosen_maps, fpr_limit)
        return result

    report = {"all": block(np.ones(labels.size, dtype=bool))}
    for defect_type in types:
        report[defect_type] = block(~labels | (defect_types == defect_type))
    return report
