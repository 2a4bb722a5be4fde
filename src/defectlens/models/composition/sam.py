"""SAM masks as the pixel-level refinement of the part classes (optional; needs SAM weights).

SAM is prompted with a grid of points, as its automatic mask generator does; the confident,
stable masks become regions (smaller masks drawn over larger ones, so parts sit on top of the
tray they lie in). Each region then takes the majority part class of its pixels: the classes
(and so the alignment across images) still come from the clusters, SAM makes them whole parts
with crisp edges.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.hf import load_sam

# SAM's own input normalisation (ImageNet statistics), on pixels scaled to 0..1.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class SamRegions:
    def __init__(self, model: str | None = None, points_per_side: int = 16, batch: int = 64,
                 min_quality: float = 0.8, min_stability: float = 0.85):
        """``min_quality``: SAM's own predicted IoU a mask needs; ``min_stability``: the IoU of
        the mask thresholded at logit -1 and +1 (a mask that changes with the cut is unsure)."""
        self.model = load_sam(model)
        self.points_per_side, self.batch = points_per_side, batch
        self.min_quality, self.min_stability = min_quality, min_stability

    def __call__(self, image: np.ndarray, size: int) -> np.ndarray:
        """(size, size) int64 region ids of an RGB image, -1 where no mask covers a pixel."""
        side = self.model.config.vision_config.image_size
        height, width = image.shape[:2]
        scale = side / max(height, width)
        fit_h, fit_w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = cv2.resize(image, (fit_w, fit_h), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        padded = np.zeros((side, side, 3), np.float32)  # SAM pads bottom-right to a square
        padded[:fit_h, :fit_w] = (resized - MEAN) / STD
        pixels = torch.from_numpy(padded.transpose(2, 0, 1))[None]
        steps = (np.arange(self.points_per_side) + 0.5) / self.points_per_side
        points = torch.tensor([[x * fit_w, y * fit_h] for y in steps for x in steps], dtype=torch.float32)
        masks, areas = [], []
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(pixels)
            for start in range(0, len(points), self.batch):
                chunk = points[start: start + self.batch]
                output = self.model(image_embeddings=embeddings, input_points=chunk[None, :, None, :],
                                    input_labels=torch.ones(1, len(chunk), 1, dtype=torch.long), multimask_output=True)
                logits, quality = output.pred_masks[0], output.iou_scores[0]  # (B, 3, m, m), (B, 3)
                best = quality.argmax(dim=1)
                rows = torch.arange(len(chunk))
                logits, quality = logits[rows, best], quality[rows, best]
                stability = (logits > 1).sum((1, 2)) / (logits > -1).sum((1, 2)).clamp_min(1)
                keep = (quality >= self.min_quality) & (stability >= self.min_stability)
                if not keep.any():
                    continue
                # Low-resolution masks cover the padded square: crop the image's part, then resize.
                low = logits[keep]
                crop_h = max(1, round(low.shape[1] * fit_h / side))
                crop_w = max(1, round(low.shape[2] * fit_w / side))
                fitted = F.interpolate(low[:, None, :crop_h, :crop_w], size=(size, size), mode="bilinear", align_corners=False)
                for mask in fitted[:, 0] > 0:
                    if mask.any():
                        masks.append(mask.numpy())
                        areas.append(int(mask.sum()))
        regions = np.full((size, size), -1, np.int64)
        for index in np.argsort(areas)[::-1]:
            regions[masks[index]] = index
        return regions


def vote_in_regions(part_map: np.ndarray, regions: np.ndarray, classes: int) -> np.ndarray:
    """Each region takes the most frequent class of its pixels; pixels outside regions keep theirs."""
    inside = regions >= 0
    if not inside.any():
        return part_map
    ids = regions[inside]
    votes = np.bincount(ids * classes + part_map[inside], minlength=(ids.max() + 1) * classes).reshape(-1, classes)
    refined = part_map.copy()
    refined[inside] = votes.argmax(axis=1)[ids]
    return refined
