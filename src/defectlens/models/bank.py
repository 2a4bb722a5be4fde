"""The searched patch bank that patchknn and patchcore share: the bank, its nearest-neighbour
index, and the IVF partition kept with the model."""

from __future__ import annotations

import numpy as np
import torch

from .memory import NearestNeighbours

#: The model-file tensor holding an IVF index's k-means centroids.
CENTROIDS = "ivf_centroids"


class SearchedBank:
    """Mixin for a :class:`~.patch.PatchDetector` with ``search`` and ``seed`` parameters whose
    learned state is a bank of patches searched for nearest neighbours.

    An IVF index's k-means partition is trained once and reused:

    - it is saved in the model file, so loading a model does not run the k-means again (about 3 s
      for a 65,536-row bank on 2 cores: 10 ms per image of a 300-image ``predict``);
    - within one ``calibrate_and_fit`` the first fit trains it and the held-out folds' fits and
      the final fit reuse it (six k-means were 18 of the 49 s of the default's fit on 200 images
      at 256 px, one thread). The partition only
      decides which bank rows a query is compared with, never a distance, so a held-out image is
      still scored against a bank without its own patches.
    """

    #: "l2" or "cosine", the distance of the patch scores.
    metric = "l2"
    #: The partition the fits of one ``calibrate_and_fit`` share (None outside it, or not yet trained).
    _shared_partition: np.ndarray | None = None
    _sharing = False

    def calibrate_and_fit(self, features: torch.Tensor, views) -> None:
        self._sharing, self._shared_partition = True, None
        try:
            super().calibrate_and_fit(features, views)
        finally:
            self._sharing, self._shared_partition = False, None

    def _set_bank(self, bank: torch.Tensor, centroids: np.ndarray | None = None) -> None:
        self.bank = bank
        if centroids is None and self._sharing:
            centroids = self._shared_partition
        self._index = NearestNeighbours(bank.numpy(), metric=self.metric, index=self.search, seed=self.seed,
                                        centroids=centroids)
        if self._sharing and self._shared_partition is None:
            self._shared_partition = self._index.centroids

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        """The bank, and the IVF centroids when the index has them."""
        tensors = {"bank": self.bank}
        centroids = self._index.centroids
        if centroids is not None:
            tensors[CENTROIDS] = torch.from_numpy(centroids)
        return tensors

    def load_bank(self, tensors: dict[str, torch.Tensor]) -> None:
        """The bank and its index from ``bank_tensors``' tensors (older files: no centroids, the
        k-means runs again)."""
        centroids = tensors.get(CENTROIDS)
        self._set_bank(tensors["bank"].float(), None if centroids is None else centroids.float().numpy())
