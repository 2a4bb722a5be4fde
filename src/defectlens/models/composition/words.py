"""Patch words: how many patches of each kind an image holds, a part count that needs no segmentation.

The part maps of :mod:`.segment` give classes to what differs in colour or covers enough of the
image; a small grey part on a grey tray (a screw, a nut) is absorbed by the region around it, so
an extra or misplaced one changes no class's count. Its patches still look like a screw's. The
words are a k-means of the references' unit patch features; an image's histogram of nearest
words moves by a screw's few patches when a screw is added, and the word score compares it with
the references' histograms word by word (see ``Memory`` in :mod:`.model`).

Where the words lie tells what the count cannot: a screw moved into the nut's compartment keeps
every count, but its patches now show a word that no reference shows anywhere near. The
placement score counts such patches: out of place is a patch whose word is not within
``PLACE_RADIUS`` cells of any place where a reference shows that word.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

#: Words in the vocabulary. On generated LOCO trays (4 shots, 5 draws per set, the composition's
#: other scores as they were, views=2, pooled) the logical AUROC of the detector was, for 8 / 12 /
#: 16 / 20 / 24 / 32 words: 0.934 / 0.939 / 0.938 / 0.942 / 0.925 / 0.919 on assembly sets 0-2,
#: 0.945 / 0.946 / 0.951 / 0.944 / 0.948 / 0.941 on sets 3-5, and 0.905 (12) / 0.902 (16) / 0.892
#: (20) / 0.878 (32) on photo_assembly 0-2 (64 and 128 words were below 32 on sets 0-2). With many
#: words one part's patches spread over several, each changing by less than normal trays vary;
#: with few, a part shares its word with more of the tray. 16 is best on the mean of the six
#: synthetic sets (2026-12-02).
WORDS = 16
#: Reference patches the k-means sees at most (a random sample beyond).
SAMPLES = 40_000
#: A word may lie this many patch cells (Chebyshev) from where a reference shows it, about an
#: eighth of the side at 256 px: a part moves within its compartment between normal trays, not
#: into the next one. Chosen among 1-6 on generated LOCO trays (assembly sets 0-2, 4 shots; 4, 5
#: and 6 within 0.003 of each other), 2026-12-02.
PLACE_RADIUS = 4


class PatchWords:
    """A vocabulary of patch features and the word histogram of an image's patches."""

    def __init__(self, words: int = WORDS, seed: int = 0):
        self.words, self.seed = words, seed
        self.centroids: torch.Tensor | None = None  # (words, D)

    def fit(self, patches: torch.Tensor) -> PatchWords:
        """From (N, D) unit patch features of the reference images."""
        points = patches.float().numpy()
        if len(points) > SAMPLES:
            points = points[np.random.default_rng(self.seed).choice(len(points), SAMPLES, replace=False)]
        from sklearn.cluster import KMeans  # here: scikit-learn costs ~0.5 s of every CLI start

        kmeans = KMeans(min(self.words, len(points)), n_init=3, random_state=self.seed).fit(points)
        self.centroids = torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))
        return self

    def nearest(self, patches: torch.Tensor) -> np.ndarray:
        """(P,) int64: the word nearest to each of the (P, D) patches."""
        # Squared distances less the patch's own norm, which does not change the nearest word.
        distances = (self.centroids**2).sum(dim=1) - 2 * patches.float() @ self.centroids.T
        return distances.argmin(dim=1).numpy()

    def counts(self, nearest: np.ndarray) -> np.ndarray:
        """(words,) float64: how many patches are nearest to each word, from ``nearest``'s words."""
        return np.bincount(nearest.ravel(), minlength=len(self.centroids)).astype(np.float64)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}centroids": self.centroids}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        if f"{prefix}centroids" not in tensors:
            raise ValueError("no patch words: the model was saved by a defectlens without the words score; fit it again")
        self.centroids = tensors[f"{prefix}centroids"].float()
        self.words = len(self.centroids)


def word_places(word_maps: np.ndarray, words: int, radius: int = PLACE_RADIUS) -> np.ndarray:
    """(words, h, w) bool: where each word may lie, within ``radius`` cells of a place where one of
    the references' (R, h, w) word maps shows it."""
    reach = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return np.stack([cv2.dilate((word_maps == w).any(axis=0).astype(np.uint8), reach) > 0 for w in range(words)])


def out_of_place(word_map: np.ndarray, places: np.ndarray) -> np.ndarray:
    """(h, w) bool: the patches of an (h, w) word map that show a word where ``places`` does not allow it."""
    rows, cols = np.indices(word_map.shape)
    return ~places[word_map, rows, cols]
