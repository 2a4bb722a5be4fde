"""From uploaded bytes to stored inspections: decode, predict, render the heatmap, persist.

Decoding and prediction run in the bounded pool (they are the CPU work); persisting runs after,
and an inspection's files are on disk and its row committed before the client hears of it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.io import ImageReadError, decode_image
from ..models import Detector
from ..report import heatmap_overlay
from .blobs import BlobStore
from .config import ConfigError
from .store import InspectionStore, utcnow

#: File signatures of the formats kept as uploaded; anything else PIL reads is stored re-encoded as PNG.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"BM", "bmp"),
               (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def check_servable(detector: Detector, path) -> None:
    """Transductive methods score the images of one batch against each other: an image's score
    would depend on what else a camera happened to send with it."""
    if detector.predict_chunk is None:
        raise ConfigError(f"{path}: {detector.name} scores a batch of images against each other, so one inspected "
                          "image has no score of its own; serve a method fitted on good images (e.g. patchcore)")


@dataclass
class LoadedModel:
    name: str
    path: Path
    detector: Detector

    @classmethod
    def load(cls, name: str, path: Path, runtime: str = "torch") -> LoadedModel:
        """The model file at ``path`` with its backbone on ``runtime`` (see runtime.load_runtime)."""
        detector = Detector.load(path)
        check_servable(detector, path)
        if runtime != "torch":
            from ..runtime import load_runtime

            detector = load_runtime(detector, runtime)
        # One prediction now builds lazily created state (backbones) before requests arrive, so
        # the first camera does not wait for it and concurrent workers never race to build it.
        detector.predict([np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)])
        return cls(name, Path(path), detector)

    def describe(self) -> dict:
        normal = self.detector.normal_scores
        return {"name": self.name, "method": self.detector.name, "threshold": self.detector.threshold,
                "map_range": list(self.detector.map_range) if self.detector.map_range else None,
                "normal_scores": 0 if normal is None else int(len(normal)), "file": self.path.name}


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class Result:
    """One upload's outcome: an error, or everything needed to store and answer it."""
    name: str
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    image_bytes: bytes = b""
    extension: str = "png"
    score: float = 0.0
    label: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    overlay_png: bytes | None = None
    seconds: float = 0.0


def _extension(data: bytes) -> str | None:
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _maps_list(maps, count: int) -> list:
    if maps is None:
        return [None] * count
    return list(maps)


def analyse(model: LoadedModel, uploads: list[Upload], max_pixels: int) -> list[Result]:
    """Decode every upload (a bad one gets its error, the rest go on), predict, render overlays."""
    results = []
    for upload in uploads:
        try:
            image = decode_image(upload.data, upload.name, max_pixels=max_pixels)
        except ImageReadError as error:
            results.append(Result(upload.name, error=error.problem))
            continue
        extension = _extension(upload.data)
        results.append(Result(upload.name, image=image, extension=extension or "png",
                              image_bytes=upload.data if extension else _png(image)))
    good = [r for r in results if r.error is None]
    if not good:
        return results
    detector = model.detector
    started = time.perf_counter()
    prediction = detector.predict([r.image for r in good])
    seconds = (time.perf_counter() - started) / len(good)
    for result, score, anomaly_map in zip(good, prediction.scores, _maps_list(prediction.maps, len(good))):
        result.score = float(score)
        result.seconds = seconds
        if detector.threshold is not None:
            result.label = "anomalous" if result.score > detector.threshold else "normal"
        if anomaly_map is not None:
            result.anomaly_map = np.asarray(anomaly_map, np.float32)
            low, high = detector.map_range or _own_range(result.anomaly_map)
            result.overlay_png = _png(heatmap_overlay(result.image, result.anomaly_map, low, high))
    return results


def _own_range(anomaly_map: np.ndarray) -> tuple[float, float]:
    """A model without a stored map range gets each map stretched to its own range (colours are
    then comparable within one image only; the API says so in 'map_scale')."""
    low, high = float(np.nanmin(anomaly_map)), float(np.nanmax(anomaly_map))
    return (low, high) if high > low else (low, low + 1e-6)


def _npy(anomaly_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # float16 halves the disk per inspection; a heatmap needs about three significant digits.
    np.save(buffer, anomaly_map.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def persist(store: InspectionStore, blobs: BlobStore, model: LoadedModel, results: list[Result]) -> list[dict | None]:
    """Write files, then commit all rows of the request in one transaction. Returns the stored rows
    in upload order (None for an upload that failed)."""
    records, positions = [], []
    now = utcnow()
    for position, result in enumerate(results):
        if result.error is not None:
            continue
        records.append({
            "created_at": now, "model": model.name, "source_name": result.name[:255],
            "image_key": blobs.put(result.image_bytes, result.extension),
            "width": int(result.image.shape[1]), "height": int(result.image.shape[0]),
            "score": result.score, "threshold": model.detector.threshold, "label": result.label,
            "inference_ms": result.seconds * 1000.0,
            "map_key": None if result.anomaly_map is None else blobs.put(_npy(result.anomaly_map), "npy"),
            "overlay_key": None if result.overlay_png is None else blobs.put(result.overlay_png, "png"),
        })
        positions.append(position)
    rows: list[dict | None] = [None] * len(results)
    for position, record, inspection_id in zip(positions, records, store.add(records) if records else []):
        rows[position] = {**record, "id": inspection_id, "verdict": None, "verdict_by": None, "verdict_at": None}
    return rows
