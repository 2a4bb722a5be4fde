"""Detectors that learn one product at a time: ``partial_fit(images, product=NAME)`` adds a
product to what the model knows and leaves the others as they are (scikit-learn's incremental
idiom). The checks every such method shares live here."""

from __future__ import annotations

import torch

from ..errors import UsageError
from .calibration import NONE

#: What predict's CSV says for an image that belongs to none of a model's products; no product
#: may carry this name.
UNKNOWN_PRODUCT = "unknown"


class LearnsProducts:
    """Mixin for a Detector. Subclasses keep ``products`` (names, in the order learned) and
    implement ``_reset`` (forget everything), ``product_features(images, progress)`` (what a
    product is learned from) and ``add_product(features, product)``."""

    products: list[str]

    def partial_fit(self, images, product: str):
        """Learn ``product`` from its normal ``images``; a name already known is refused (fit a
        new model to re-learn it)."""
        if not isinstance(product, str) or not product.strip():
            raise UsageError(f"{self.name}: a product needs a non-empty name, not {product!r}")
        if product == UNKNOWN_PRODUCT:
            raise UsageError(f"{self.name}: '{UNKNOWN_PRODUCT}' cannot name a product: predict's CSV says it for "
                             "images of no known product")
        if product in self.products:
            raise UsageError(f"{self.name}: the model already knows product '{product}' (known: {', '.join(self.products)})")
        self.validate_params()
        images = list(images)
        if not images:
            raise UsageError(f"{self.name}: product '{product}' needs at least one normal image")
        return self.partial_fit_features(self.product_features(images, progress=f"features {product}"), product)

    def partial_fit_features(self, features: torch.Tensor, product: str):
        """``partial_fit`` on precomputed features (benchmarks embed once)."""
        if not self._fitted:
            self._reset()
            self.set_calibration(NONE)
        self.add_product(features, product)
        self._fitted = True
        return self
