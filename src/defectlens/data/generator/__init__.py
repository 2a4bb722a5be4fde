"""Deterministic synthetic anomaly-detection datasets in MVTec AD and MVTec LOCO layouts.

Tests, the demo and benchmarks need labelled data without a download. The scenes carry real
normal variation (stochastic texture, pose jitter, lighting, sensor noise) and the defects are
small and low-contrast, so a pixel-difference detector is not enough; every mask is computed
from the very geometry that altered the pixels. (Not to be confused with ``defectlens.synthesis``,
which makes anomalies from a dataset's real normal images.)

Modules: ``render`` drawing primitives and the sensor model; ``textures`` and ``objects`` the
MVTec-layout categories; ``defects`` the structural defects drawn on them; ``mvtec`` the category
registry; ``loco`` the LOCO-layout assembly scene and its anomalies; ``writer`` the files on disk;
``dataset`` the entry points re-exported here.
"""

from .dataset import generate, render_pair
from .defects import STRUCTURAL_DEFECTS
from .loco import LOCO_CATEGORY, LOCO_STRUCTURAL_DEFECTS, LOGICAL_DEFECTS
from .mvtec import DEFAULT_MVTEC_CATEGORIES, MVTEC_CATEGORIES

__all__ = ["DEFAULT_MVTEC_CATEGORIES", "LOCO_CATEGORY", "LOCO_STRUCTURAL_DEFECTS", "LOGICAL_DEFECTS",
           "MVTEC_CATEGORIES", "STRUCTURAL_DEFECTS", "generate", "render_pair"]
