"""GCAD (Bergmann et al., IJCV 2022, "Beyond Dents and Scratches"), sized for a CPU.

Two branches, both trained on normal images only, both regressing features:

* local: a student with a 48-px receptive field regresses the frozen teacher's patch features:
  the backbone's finest level (EfficientNet-Lite's stride-8 stage, whose receptive field is close
  to the student's, so a normal patch can be predicted from the patch alone), reduced by a PCA
  fitted on the normal features. Where the image holds a structure never seen in training, the
  student cannot follow the teacher: structural anomalies.
* global: an autoencoder regresses the same teacher features through a 64-d bottleneck, which
  can hold the layout of a normal scene but not the details of one image; a global regressor
  learns the autoencoder's output: the paper's U-Net with skip connections over the whole image
  (``global_network="unet"``) or a student with the local one's small receptive field
  (``"student"``). On normal images it learns the
  autoencoder's usual output for each local look; when the scene breaks a global rule (a part
  missing, doubled, swapped), the autoencoder's output disagrees with what the local view
  predicts: logical anomalies.

Each branch's squared-error map is normalised by its 0.9 and 0.995 quantiles on held-out normal
images (so both have the same scale) and the two are summed; the image score is the map's maximum.

CPU sizing: 256-px input, 32×32 grid, networks of a few hundred thousand weights with batch norm,
students trained on 128-px crops, 300 to 1000 Adam steps (see ``_steps``), few images padded out
with altered copies (pose and lighting).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...backbones import DEFAULT_BACKBONE
from ...data.io import as_image
from ..base import BackboneDetector, Prediction, register
from ..calibration import Calibration, calibrate, heatmap_range, held_out_split
from ..params import BACKBONE, BATCH_SIZE, BLUR_SIGMA, INPUT_SIZE, SEED, Choice, Integer, Optional, Real
from .networks import AutoEncoder, GlobalRegressor, Student

# Held-out normal images for map normalisation and the threshold: at most 40 (enough cells for
# a 0.995 quantile and scores for a threshold; the rest is better spent on training).
HELD_OUT_MAX = 40
QUANTILES = (0.9, 0.995)
# Training steps when ``steps`` is not given: more images need more steps, up to the CPU budget.
MIN_STEPS, STEPS_PER_IMAGE, MAX_STEPS = 300, 10, 1000
# The student trains on crops of 16×16 cells (128 px): a third of the cost of whole images,
# and the same result since each of its output cells sees only its own patch.
CROP_CELLS = 16
# Few images get more altered copies, up to about this many images in all: a handful of photos
# cannot show how far the pose and lighting of a normal part vary.
AUGMENT_TO, MAX_COPIES = 32, 7
BATCH = 8  # images per forward pass outside training
STRIDE = 8  # input pixels per cell of the teacher's grid and of the students' output


@register
class GCAD(BackboneDetector):
    name = "gcad"
    parameter_constraints = {"backbone": BACKBONE, "size": INPUT_SIZE, "dims": Integer(1, 1024), "width": Integer(4, 512),
                             "receptive_field": Integer(16, 256),
                             "bottleneck": Integer(1, 4096), "steps": Optional(Integer(1, 10**6)), "batch_size": BATCH_SIZE,
                             "lr": Real(0.0, 1.0, open_low=True), "augment": Optional(Integer(0, 64)),
                             "global_network": Choice(("student", "unet")),
                             "blur_sigma": BLUR_SIGMA, "seed": SEED}

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int = 256, dims: int = 32, width: int = 32,
                 receptive_field: int = 48, bottleneck: int = 64, steps: int | None = None, batch_size: int = 8,
                 lr: float = 3e-3, augment: int | None = None, global_network: str = "student",
                 blur_sigma: float = 4.0, seed: int = 0):
        """``dims``: teacher channels kept by the PCA (the regression targets). ``width``: base
        width of the students and the autoencoder. ``receptive_field``: pixels a student's cell
        sees (32, 48, 64, ...). ``bottleneck``: size of the autoencoder's vector. ``steps``:
        training steps (None: 10 per training image, 300 to 1000).
        ``augment``: altered copies (pose and lighting) added per training image (None: enough
        for 32 images in all, 1 to 7). ``global_network``: what regresses the autoencoder's
        output, "unet" (the paper: a U-Net over the whole image) or "student" (a
        ``receptive_field``-px student like the local one)."""
        self.backbone = backbone
        self.size = size
        self.dims = dims
        self.width = width
        self.receptive_field = receptive_field
        self.bottleneck = bottleneck
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.augment = augment
        self.global_network = global_network
        self.blur_sigma = blur_sigma
        self.seed = seed
        self._build_networks()
        self.autoencoder = AutoEncoder(dims, bottleneck, width)
        for network in self._networks().values():
            network.eval()  # batch norm: running statistics, unless training
        # Teacher reduction: per-channel mean and std, then PCA components (C, dims).
        self.feature_mean = self.feature_std = self.components = None
        #: (2, 2): the 0.9 and 0.995 quantiles of the local and of the global map on held-out normal images.
        self.quantiles: torch.Tensor | None = None
        #: Loss per training step (local, autoencoder, global), for inspection and tests.
        self.losses: np.ndarray | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone_network.feature_hw

    # -- contract ---------------------------------------------------------------------------
    def fit_images(self, images: list, masks: list, labels: list[int]) -> None:
        resized = np.stack([self._resize(as_image(image)) for image in tqdm(images, desc="gcad read", unit="img", leave=False)])
        train_ids, held_ids = held_out_split(len(resized), self.seed, most=HELD_OUT_MAX)
        held_out, train = resized[held_ids], resized[train_ids]
        copies = self._augmented(train, self._copies(len(train)))
        teacher = self._teacher(copies, progress="gcad teacher")
        self._fit_projection(teacher[: len(train)])
        self._train(copies, self._project(teacher), self._steps(len(train)))
        # Calibrate on the held-out images. Without any (few images), the map quantiles come from
        # the training images and an altered copy of each (optimistic), and there is no threshold.
        # (Altered copies are not added beyond that: where the camera is fixed, their pose changes
        # are not normal and would raise the threshold.)
        if len(held_out):
            self.set_calibration(calibrate(*self._calibrate(held_out)))
        else:
            self.set_calibration(Calibration(map_range=heatmap_range(self._calibrate(self._augmented(train, 1))[1])))

    def predict_images(self, images: list) -> Prediction:
        images = [as_image(image) for image in images]
        scores, maps = [], []
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            smooth = self._smooth(self._combine(*self._branch_maps(np.stack([self._resize(i) for i in chunk]))))
            scores.append(smooth.reshape(len(chunk), -1).max(axis=1))
            maps += [cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR) for m, image in zip(smooth, chunk)]
        return Prediction(scores=np.concatenate(scores).astype(np.float64) if scores else np.zeros(0),
                          maps=maps)

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{k}": v for name, network in self._networks().items() for k, v in network.state_dict().items()}
        return tensors | {"feature_mean": self.feature_mean, "feature_std": self.feature_std,
                          "components": self.components, "quantiles": self.quantiles}

    def load_state_tensors(self, tensors, extra) -> None:
        for name, network in self._networks().items():
            network.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        self.feature_mean, self.feature_std = tensors["feature_mean"], tensors["feature_std"]
        self.components, self.quantiles = tensors["components"], tensors["quantiles"]

    # -- internals --------------------------------------------------------------------------
    def _build_networks(self) -> None:
        self.local_student = Student(self.dims, self.width, self.receptive_field)
        self.global_student = (GlobalRegressor(self.dims, self.width) if self.global_network == "unet"
                               else Student(self.dims, self.width, self.receptive_field))
        self.autoencoder = AutoEncoder(self.dims, self.bottleneck, self.width)

    def _global(self, inputs: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """The global regressor's output on whole images (the U-Net) or on padded images or crops."""
        return self.global_student(inputs) if self.global_network == "unet" else self.global_student(padded)

    def _networks(self) -> dict[str, torch.nn.Module]:
        return {"local_student": self.local_student, "global_student": self.global_student, "autoencoder": self.autoencoder}

    def _resize(self, image: np.ndarray) -> np.ndarray:
        height, width = self.backbone_network.input_hw
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 at input size -> the backbone's normalised (N, 3, H, W) float."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.backbone_network.mean).view(1, 3, 1, 1)
        return (batch - mean) / torch.tensor(self.backbone_network.std).view(1, 3, 1, 1)

    def _copies(self, count: int) -> int:
        if self.augment is not None:
            return self.augment
        return min(MAX_COPIES, max(1, math.ceil(AUGMENT_TO / count) - 1))

    def _augmented(self, images: np.ndarray, copies: int) -> np.ndarray:
        """The images followed by ``copies`` altered copies of each: a small random shift, rotation
        and scale (the pose of a part varies between photos) and brightness and contrast changes
        (so does the lighting). Which part is where, the layout, is left as it is."""
        rng = np.random.default_rng(self.seed + 1)
        height, width = images.shape[1:3]
        altered = []
        for _ in range(copies):
            for image in images:
                matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-4, 4), rng.uniform(0.96, 1.04))
                matrix[:, 2] += rng.uniform(-0.03, 0.03, 2) * (width, height)
                moved = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
                contrast, brightness = rng.uniform(0.85, 1.15, 2)
                mean = moved.mean()
                altered.append(np.clip(((moved - mean) * contrast + mean) * brightness, 0, 255).round().astype(np.uint8))
        return np.concatenate([images, np.stack(altered)]) if altered else images

    def _teacher(self, images: np.ndarray, progress: str | None = None) -> torch.Tensor:
        features = []
        starts = range(0, len(images), BATCH)
        with torch.inference_mode():
            for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
                features.append(self._teacher_features(self._tensor(images[start : start + BATCH])))
        return torch.cat(features)

    def _teacher_features(self, inputs: torch.Tensor) -> torch.Tensor:
        channels, stride = self.backbone_network.levels[0]
        if stride != STRIDE:
            raise ValueError(f"gcad needs a backbone whose finest level has stride {STRIDE}, not {stride}")
        return self.backbone_network.forward(inputs)[:, :channels]

    def _fit_projection(self, features: torch.Tensor) -> None:
        """Standardise channels, keep the ``dims`` leading principal components, scaled so the
        kept channels have unit variance on average (the losses start near 1)."""
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        standard = (flat - mean) / std
        values, vectors = torch.linalg.eigh(standard.T @ standard / max(len(standard) - 1, 1))
        dims = self.dims
        if dims > len(values):
            raise ValueError(f"gcad: dims={dims} is more than the teacher's {len(values)} channels")
        kept = vectors[:, -dims:].flip(1) / values[-dims:].clamp_min(1e-12).mean().sqrt()
        self.feature_mean, self.feature_std, self.components = mean.float(), std.float(), kept.float()

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        standard = (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)
        return torch.einsum("nchw,cd->ndhw", standard, self.components)

    def _steps(self, count: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return min(MAX_STEPS, max(MIN_STEPS, STEPS_PER_IMAGE * count))

    def _train(self, images: np.ndarray, targets: torch.Tensor, steps: int) -> None:
        seed = self.seed
        torch.manual_seed(seed)
        self._build_networks()
        networks = self._networks().values()
        parameters = [p for network in networks for p in network.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=self.lr, weight_decay=1e-5)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
        generator = torch.Generator().manual_seed(seed)
        batch = min(self.batch_size, len(images))
        crop = tuple(min(CROP_CELLS, size) for size in self.grid)
        losses = np.zeros((steps, 3))
        progress = tqdm(range(steps), desc="gcad train", unit="step", leave=False)
        order = torch.empty(0, dtype=torch.long)
        for step in progress:
            if len(order) < batch:  # each image once per epoch: with few images every batch holds them all
                order = torch.cat([order, torch.randperm(len(images), generator=generator)])
            picked, order = order[:batch], order[batch:]
            inputs, target = self._tensor(images[picked.numpy()]), targets[picked]
            rebuilt = self.autoencoder(inputs, self.grid)
            rows, cols = (self._crop_start(size, cells, generator) for size, cells in zip(self.grid, crop))
            window = (slice(None), slice(None), slice(rows, rows + crop[0]), slice(cols, cols + crop[1]))
            pad = self.local_student.pad
            padded = self.local_student.padded(inputs)[:, :, STRIDE * rows : STRIDE * (rows + crop[0]) + 2 * pad,
                                                       STRIDE * cols : STRIDE * (cols + crop[1]) + 2 * pad]
            local = self.local_student(padded)
            # The global regressor learns the autoencoder's output, not the other way round: detach.
            # The U-Net sees whole images (its reach is the point); a student, crops.
            if self.global_network == "unet":
                global_loss = F.mse_loss(self.global_student(inputs), rebuilt.detach())
            else:
                global_loss = F.mse_loss(self.global_student(padded), rebuilt.detach()[window])
            parts = (F.mse_loss(local, target[window]), F.mse_loss(rebuilt, target), global_loss)
            optimiser.zero_grad(set_to_none=True)
            sum(parts).backward()
            optimiser.step()
            schedule.step()
            losses[step] = [p.item() for p in parts]
            if step % 10 == 0:
                progress.set_postfix(local=f"{losses[step, 0]:.3f}", ae=f"{losses[step, 1]:.3f}", glob=f"{losses[step, 2]:.3f}")
        self.losses = losses
        for network in networks:
            network.eval()

    @staticmethod
    def _crop_start(size: int, cells: int, generator: torch.Generator) -> int:
        """First cell of a crop: one of the tiles that cover the grid (the last one flush with the
        edge). The students' cells are independent, so where a crop lies does not matter, only
        that every cell is trained as often: uniform random starts would leave the image's border
        almost untrained, and its errors would then decide the image scores."""
        starts = sorted({*range(0, size - cells + 1, cells), size - cells})
        return starts[torch.randint(len(starts), (1,), generator=generator).item()]

    def _branch_maps(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw local and global squared-error maps (N, h, w) of resized uint8 images."""
        local_maps, global_maps = [], []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                inputs = self._tensor(images[start : start + BATCH])
                teacher = self._project(self._teacher_features(inputs))
                padded = self.local_student.padded(inputs)
                local, global_ = self.local_student(padded), self._global(inputs, padded)
                rebuilt = self.autoencoder(inputs, self.grid)
                local_maps.append((teacher - local).square().mean(1))
                global_maps.append((rebuilt - global_).square().mean(1))
        return torch.cat(local_maps), torch.cat(global_maps)

    def _combine(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Each map rescaled so its held-out 0.9 quantile is 0 and 0.995 quantile is 1, summed."""
        (low_l, high_l), (low_g, high_g) = self.quantiles.tolist()
        return (local - low_l) / max(high_l - low_l, 1e-12) + (global_ - low_g) / max(high_g - low_g, 1e-12)

    def _smooth(self, grid_maps: torch.Tensor) -> np.ndarray:
        """Grid maps -> input size, Gaussian smoothing (sigma in input pixels)."""
        height, width = self.backbone_network.input_hw
        maps = F.interpolate(grid_maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0].numpy()
        sigma = self.blur_sigma
        if sigma > 0:
            maps = np.stack([cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT) for m in maps])
        return maps.astype(np.float32)

    def _calibrate(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quantiles of each branch's map on normal images the networks did not learn from,
        then the images' scores and maps."""
        local, global_ = self._branch_maps(images)
        levels = torch.tensor(QUANTILES)
        self.quantiles = torch.stack([torch.quantile(local.flatten(), levels), torch.quantile(global_.flatten(), levels)])
        smooth = self._smooth(self._combine(local, global_))
        return smooth.reshape(len(images), -1).max(axis=1).astype(np.float64), smooth
