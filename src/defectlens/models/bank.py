"""The searched patch bank that patchknn and patchcore share: the bank, its nearest-neighbour
index, and the IVF partition kept with the model."""

from __future__ import annotations

import numpy as np
import torch

from .memory import NearestNeighbours

#: The model-file tensors holding an IVF index's k-means centroids and each bank row's list.
CENTROIDS, ROW_LISTS = "ivf_centroids", "ivf_row_lists"


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
    #: Within one ``calibrate_and_fit``: the IVF list of each of its patches found so far (-1: not yet).
    _patch_lists: np.ndarray | None = None
    _sharing = False

    def calibrate_and_fit(self, features: torch.Tensor, views) -> None:
        self._sharing, self._shared_partition, self._patch_lists = True, None, None
        try:
            super().calibrate_and_fit(features, views)
        finally:
            self._sharing, self._shared_partition, self._patch_lists = False, None, None

    def _set_bank(self, bank: torch.Tensor, centroids: np.ndarray | None = None,
                  row_lists: np.ndarray | None = None, patches: tuple[torch.Tensor, int] | None = None) -> None:
        """``patches``: within ``calibrate_and_fit``, the bank rows' numbers among all the fit's
        patches and how many patches there are; a patch's IVF list, found in one fit, is then
        looked up in the next instead of searched for again (the five held-out folds' banks and
        the final one share most of their rows)."""
        if self._sharing:
            centroids = self._shared_partition if centroids is None else centroids
            if patches is not None and centroids is not None:
                row_lists = self._lists_of_patches(bank, *patches)
        # The fit before's bank and index go before the new index is built, not after: two
        # banks' worth (80 MB for the default's 65,536 rows) at the peak of a calibrating fit.
        self.bank, self._index = bank, None
        self._index = NearestNeighbours(bank.numpy(), metric=self.metric, index=self.search, seed=self.seed,
                                        centroids=centroids, row_lists=row_lists)
        if self._sharing and self._shared_partition is None:
            self._shared_partition = self._index.centroids
            if patches is not None and self._index.kind == "ivf":
                self._patch_list_table(patches[1])[patches[0].numpy()] = self._index.row_lists

    def _patch_list_table(self, total: int) -> np.ndarray:
        """``_patch_lists``, made (all unknown) for ``total`` patches on first use."""
        if self._patch_lists is None:
            self._patch_lists = np.full(total, -1, dtype=np.int32)
        return self._patch_lists

    def _lists_of_patches(self, bank: torch.Tensor, numbers: torch.Tensor, total: int) -> np.ndarray:
        """The IVF lists of bank rows that are the fit's patches ``numbers``: known ones looked
        up, the others assigned (by the partition of the fit before) and remembered."""
        table, numbers = self._patch_list_table(total), numbers.numpy()
        row_lists = table[numbers].astype(np.int64)
        unknown = np.flatnonzero(row_lists < 0)
        if len(unknown):
            row_lists[unknown] = self._index.assign(bank[torch.from_numpy(unknown)].numpy())
            table[numbers[unknown]] = row_lists[unknown]
        return row_lists

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        """The bank, and the IVF centroids and row lists when the index has them."""
        tensors = {"bank": self.bank}
        centroids = self._index.centroids
        if centroids is not None:
            tensors[CENTROIDS] = torch.from_numpy(centroids)
            tensors[ROW_LISTS] = torch.from_numpy(self._index.row_lists.astype(np.int32))
        return tensors

    def load_bank(self, tensors: dict[str, torch.Tensor]) -> None:
        """The bank and its index from ``bank_tensors``' tensors (older files: no centroids, the
        k-means runs again; no row lists, the rows are assigned to lists again)."""
        centroids, row_lists = tensors.get(CENTROIDS), tensors.get(ROW_LISTS)
        self._set_bank(tensors["bank"].float(), None if centroids is None else centroids.float().numpy(),
                       None if row_lists is None else row_lists.long().numpy())
