"""AnoGen (ECCV 2024) with Stable Diffusion: a learned defect embedding, generated inside a box.

1. Learn the embedding: a new token ``<defect>`` (started from the word "defect") is optimised by
   textual inversion on crops around the few real defects, with the noise-prediction loss weighted
   by the defect mask, so the tiny defect, not its surroundings, shapes the embedding.
2. Generate: a normal image's crop around a random box is denoised from noise under the prompt with
   ``<defect>``; after every step the latents outside the box are replaced by the original's latents
   noised to that step, z_t = z_n^t ⊙ (1 - M_box) + z'_t ⊙ M_box, so the defect grows inside the box
   and fits what surrounds it. Only the box's pixels are pasted back; the box is the weak label.

Weights come from a local Stable Diffusion folder (diffusers layout: unet/, vae/, text_encoder/,
tokenizer/, scheduler/) named by ``sd_model`` or DEFECTLENS_SD_MODEL; nothing is downloaded.
``diffusers`` and ``transformers`` are imported only when a model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..errors import DatasetError
from .anogen import _as_mask, defect_size, extract_defects, place_box
from .base import Box, SyntheticAnomaly, box_mask, check_image, foreground_mask

PLACEHOLDER = "<defect>"
TEMPLATES = ("a photo of a {}", "a close-up photo of a {}", "an industrial photo of a part with a {}",
             "a cropped photo of a surface with a {}")


@dataclass
class DiffusionParts:
    """The Stable Diffusion pieces this module drives, with frozen weights."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # a diffusers scheduler with add_noise, set_timesteps and step (DDIM by default)

    def __post_init__(self):
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_parts(sd_model: str | None = None, device: str | None = None) -> DiffusionParts:
    """Stable Diffusion parts from a local diffusers folder (or the HF cache), never downloaded.

    Raises :class:`~defectlens.backbones.hf.ModelNotAvailable` with one message saying what is
    missing and how to get it.
    """
    from defectlens.backbones.hf import ModelNotAvailable, _how_to, resolve_model

    source = resolve_model("sd", sd_model)
    try:
        import diffusers
        import transformers
    except ImportError:
        raise ModelNotAvailable("diffusion synthesis needs `diffusers` and `transformers`: pip install 'defectlens[hf]'") from None
    try:
        options = {"pretrained_model_name_or_path": source, "local_files_only": True}
        # low_cpu_mem_usage=False: the default asks for `accelerate` and warns when it is absent
        parts = DiffusionParts(
            unet=diffusers.UNet2DConditionModel.from_pretrained(subfolder="unet", low_cpu_mem_usage=False, **options),
            vae=diffusers.AutoencoderKL.from_pretrained(subfolder="vae", low_cpu_mem_usage=False, **options),
            text_encoder=transformers.CLIPTextModel.from_pretrained(subfolder="text_encoder", **options),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(subfolder="tokenizer", **options),
            scheduler=diffusers.DDIMScheduler.from_pretrained(subfolder="scheduler", **options),
        )
    except (OSError, ValueError) as error:
        if Path(source).exists():
            problem = f"Stable Diffusion folder '{source}' could not be loaded ({str(error).strip().splitlines()[0]})"
        else:  # the libraries' own message talks about the hub and the network, which misleads offline
            problem = f"Stable Diffusion model '{source}' is neither a folder on this machine nor in the Hugging Face cache"
        raise ModelNotAvailable(f"{problem}; {_how_to('sd')}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for model in (parts.unet, parts.vae, parts.text_encoder):
        model.to(device)
    return parts


# -- the learned embedding ------------------------------------------------------------------------
def placeholder_token(parts: DiffusionParts, init_word: str = "defect") -> tuple[int, torch.Tensor]:
    """Add ``<defect>`` to the tokenizer (once) and return its id and the mean embedding of ``init_word``."""
    tokenizer, encoder = parts.tokenizer, parts.text_encoder
    if PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([PLACEHOLDER])
    if encoder.get_input_embeddings().weight.shape[0] < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        encoder.requires_grad_(False)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    start = encoder.get_input_embeddings().weight[ids].mean(0).detach().clone()
    return tokenizer.convert_tokens_to_ids(PLACEHOLDER), start


def encode_prompts(parts: DiffusionParts, prompts: Sequence[str], embedding: torch.Tensor) -> torch.Tensor:
    """Text-encoder states of ``prompts`` with every ``<defect>`` token embedded as ``embedding``
    (gradients flow into it)."""
    token_id, _ = placeholder_token(parts)
    ids = parts.tokenizer(list(prompts), padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(parts.device)
    vector = embedding.to(parts.device)

    def inject(module, inputs, output):
        return torch.where((inputs[0] == token_id)[..., None], vector.to(output.dtype), output)

    handle = parts.text_encoder.get_input_embeddings().register_forward_hook(inject)
    try:
        return parts.text_encoder(ids)[0]
    finally:
        handle.remove()


def encode_images(parts: DiffusionParts, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """Scaled VAE latents of N×3×S×S images in [-1, 1]."""
    dist = parts.vae.encode(images.to(parts.device)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return latents * parts.vae.config.scaling_factor


def masked_diffusion_loss(parts: DiffusionParts, latents: torch.Tensor, weights: torch.Tensor, states: torch.Tensor,
                          noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The mask-weighted LDM loss ‖(target − ε_θ(z_t, t, v)) ⊙ M‖², averaged over the masked cells.

    ``weights``: N×1×h×w defect mask at latent resolution. The target is the noise, or the velocity
    for v-prediction schedulers.
    """
    noisy = parts.scheduler.add_noise(latents, noise, timesteps)
    predicted = parts.unet(noisy, timesteps, encoder_hidden_states=states).sample
    if parts.scheduler.config.prediction_type == "v_prediction":
        target = parts.scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    squared = (predicted - target) ** 2 * weights
    return squared.sum() / (weights.sum() * latents.shape[1]).clamp(min=1e-6)


def square_around(box: Box, shape: tuple[int, int], side: int) -> Box:
    """A ``side``-pixel square (at most the image's shorter side) centred on ``box``, moved inside the image."""
    h, w = shape
    side = int(min(side, h, w))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, x0 + side, y0 + side


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def defect_crops(images: Sequence, masks: Sequence, size: int, context: float = 4.0,
                 min_side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops around every defect region, ``context`` times its size (at least ``min_side``
    px), resized to ``size``: (N×3×S×S images in [-1, 1], N×1×S×S float masks)."""
    crops, crop_masks = [], []
    for item, mask_item in zip(images, masks):
        image = check_image(item)
        mask = _as_mask(mask_item, image.shape[:2])
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        for label in range(1, count):
            x, y, bw, bh, _ = stats[label]
            x0, y0, x1, y1 = square_around((x, y, x + bw, y + bh), mask.shape, max(min_side, int(context * max(bw, bh))))
            crops.append(_to_tensor(cv2.resize(image[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)))
            soft = cv2.resize(mask[y0:y1, x0:x1].astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
            crop_masks.append(torch.from_numpy(soft)[None])
    if not crops:
        raise DatasetError("the anomaly masks hold no defect pixels")
    return torch.stack(crops), torch.stack(crop_masks)


def latent_weights(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel masks → latent-cell masks: a cell counts when any of its pixels is defect."""
    return torch.nn.functional.max_pool2d((masks > 0).float(), factor)


def learn_embedding(parts: DiffusionParts, images: Sequence, masks: Sequence, steps: int = 300,
                    learning_rate: float = 5e-3, size: int = 512, batch_size: int = 2, seed: int = 0,
                    init_word: str = "defect", progress: bool = True) -> torch.Tensor:
    """Textual inversion of the defects in ``images`` / ``masks`` with the mask-weighted loss.

    Returns the learned ``<defect>`` embedding (a vector of the text encoder's width).
    """
    _, start = placeholder_token(parts, init_word)
    pixels, pixel_masks = defect_crops(images, masks, size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = encode_images(parts, pixels)
    weights = latent_weights(pixel_masks, parts.vae_factor).to(parts.device)
    embedding = torch.nn.Parameter(start.clone())
    optimiser = torch.optim.AdamW([embedding], lr=learning_rate, weight_decay=0.0)
    train_steps = parts.scheduler.config.num_train_timesteps
    for _ in tqdm(range(steps), desc="learning <defect> embedding", disable=not progress):
        pick = torch.randint(len(latents), (batch_size,), generator=generator)
        batch, batch_weights = latents[pick], weights[pick]
        if torch.rand((), generator=generator) < 0.5:  # mirrored defects are still defects
            batch, batch_weights = batch.flip(-1), batch_weights.flip(-1)
        prompts = [TEMPLATES[int(i)].format(PLACEHOLDER) for i in torch.randint(len(TEMPLATES), (batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator).to(parts.device)
        timesteps = torch.randint(train_steps, (batch_size,), generator=generator).to(parts.device)
        loss = masked_diffusion_loss(parts, batch, batch_weights, encode_prompts(parts, prompts, embedding), noise, timesteps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return embedding.detach().cpu()


# -- box-guided generation ------------------------------------------------------------------------
@torch.no_grad()
def guided_denoise(parts: DiffusionParts, original: torch.Tensor, box: torch.Tensor, states: torch.Tensor,
                   empty_states: torch.Tensor, steps: int = 30, guidance: float = 5.0, strength: float = 1.0,
                   generator: torch.Generator | None = None,
                   on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise latents where ``box`` (1×1×h×w, 1 inside) is set, keep the noised ``original`` elsewhere.

    Starts from noise (``strength`` 1) or from the original noised to ``strength`` of the schedule;
    after every scheduler step z_t = noised(original, t) · (1 − box) + z'_t · box, with one fixed
    noise draw, and the last step leaves the original itself outside the box. ``guidance`` is the
    classifier-free guidance scale (``empty_states`` = the empty prompt). ``on_step(i, t, latents)``
    sees the blended latents after each step.
    """
    scheduler = parts.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[min(round(steps * (1 - strength)), steps - 1):]
    noise = torch.randn(original.shape, generator=generator).to(original.device)
    outside = scheduler.add_noise(original, noise, timesteps[:1])
    latents = noise * scheduler.init_noise_sigma if strength >= 1 else outside
    latents = outside * (1 - box) + latents * box
    conditions = torch.cat([empty_states, states]) if guidance > 1 else states
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guidance > 1 else latents
        model_input = scheduler.scale_model_input(model_input, t)
        predicted = parts.unet(model_input, t, encoder_hidden_states=conditions).sample
        if guidance > 1:
            unconditional, conditional = predicted.chunk(2)
            predicted = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(predicted, t, latents, generator=generator).prev_sample
        outside = scheduler.add_noise(original, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else original
        latents = outside * (1 - box) + latents * box
        if on_step is not None:
            on_step(i, int(t), latents)
    return latents


def _feathered_box(box: Box, shape: tuple[int, int], width: float) -> np.ndarray:
    """1 deep inside ``box``, falling to 0 at its edge over ``width`` px; 0 outside."""
    inside = box_mask(box, shape).astype(np.uint8)
    distance = cv2.distanceTransform(np.pad(inside, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    return np.clip(distance / max(width, 1e-6), 0, 1).astype(np.float32)


@torch.no_grad()
def generate_in_box(parts: DiffusionParts, image: np.ndarray, box: Box, embedding: torch.Tensor, size: int = 512,
                    context: float = 4.0, min_side: int = 64, steps: int = 30, guidance: float = 5.0,
                    strength: float = 1.0, generator: torch.Generator | None = None,
                    prompt: str = TEMPLATES[0]) -> np.ndarray:
    """``image`` with a defect generated inside ``box``; only the box's pixels change.

    The crop around the box (``context`` × the box's side, at least ``min_side`` px) is worked on
    at ``size`` px; ``prompt`` holds ``{}`` for the learned token.
    """
    image = check_image(image)
    h, w = image.shape[:2]
    side = max(min_side, int(context * max(box[2] - box[0], box[3] - box[1])))
    cx0, cy0, cx1, cy1 = square_around(box, (h, w), side)
    crop = cv2.resize(image[cy0:cy1, cx0:cx1], (size, size), interpolation=cv2.INTER_AREA)
    original = encode_images(parts, _to_tensor(crop)[None])
    cells = size // parts.vae_factor
    scale = cells / (cx1 - cx0)
    region = torch.zeros(1, 1, cells, cells, device=original.device)
    region[..., int((box[1] - cy0) * scale):math.ceil((box[3] - cy0) * scale),
           int((box[0] - cx0) * scale):math.ceil((box[2] - cx0) * scale)] = 1
    states = encode_prompts(parts, [prompt.format(PLACEHOLDER)], embedding)
    empty = encode_prompts(parts, [""], embedding)
    latents = guided_denoise(parts, original, region, states, empty, steps, guidance, strength, generator)
    decoded = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample[0]
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).round().byte().cpu().numpy()
    generated = cv2.resize(decoded, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_AREA)
    # Feather inside the box: the VAE does not reproduce pixels exactly, so a hard edge would show.
    alpha = _feathered_box(box, (h, w), max(2.0, 0.15 * min(box[2] - box[0], box[3] - box[1])))[cy0:cy1, cx0:cx1, None]
    out = image.copy()
    window = out[cy0:cy1, cx0:cx1].astype(np.float32)
    out[cy0:cy1, cx0:cx1] = np.round(generated * alpha + window * (1 - alpha)).astype(np.uint8)
    return out


def save_embedding(path, embedding: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"defect": embedding.detach().cpu().contiguous()}, str(path), metadata={"token": PLACEHOLDER})


def load_embedding(path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["defect"]


class DiffusionSynthesizer:
    """AnoGen with Stable Diffusion: learn ``<defect>`` from the anomaly examples, then generate a
    defect in a random box on the object of each normal image.

    ``sd_model``: local Stable Diffusion folder (else DEFECTLENS_SD_MODEL); ``parts``: already
    loaded parts instead. ``embedding``: a learned embedding (tensor or file from
    :func:`save_embedding`) to skip training; otherwise ``train_steps`` of textual inversion at
    ``learning_rate``. Boxes follow :class:`~defectlens.synthesis.AnoGenSynthesizer` (sizes from the
    real defects times U(``scale``), ``min_overlap`` on the GrabCut foreground). ``size``, ``steps``,
    ``guidance``, ``strength``: see :func:`generate_in_box`.
    """

    kind = "diffusion"

    def __init__(self, anomaly_images: Sequence, anomaly_masks: Sequence, sd_model: str | None = None,
                 parts: DiffusionParts | None = None, embedding: torch.Tensor | str | None = None,
                 train_steps: int = 300, learning_rate: float = 5e-3, size: int = 512, steps: int = 30,
                 guidance: float = 5.0, strength: float = 1.0, scale: tuple[float, float] = (0.75, 1.5),
                 min_overlap: float = 0.5, device: str | None = None, seed: int = 0, progress: bool = True):
        self.parts = parts if parts is not None else load_parts(sd_model, device)
        self.examples = extract_defects(anomaly_images, anomaly_masks, context=0.5)
        if not self.examples:
            raise DatasetError("the anomaly masks hold no defect region to learn from")
        if isinstance(embedding, str):
            embedding = load_embedding(embedding)
        if embedding is None:
            embedding = learn_embedding(self.parts, anomaly_images, anomaly_masks, steps=train_steps,
                                        learning_rate=learning_rate, size=size, seed=seed, progress=progress)
        self.embedding = embedding
        self.size, self.steps, self.guidance, self.strength = size, steps, guidance, strength
        self.scale, self.min_overlap = scale, min_overlap

    def __call__(self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None) -> SyntheticAnomaly:
        image = check_image(image)
        h, w = image.shape[:2]
        foreground = foreground_mask(image) if foreground is None else np.asarray(foreground, bool)
        example = self.examples[rng.integers(len(self.examples))]
        box = place_box(defect_size(example, (h, w), self.scale, rng), foreground, rng, self.min_overlap)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        out = generate_in_box(self.parts, image, box, self.embedding, size=self.size, steps=self.steps,
                              guidance=self.guidance, strength=self.strength, generator=generator,
                              prompt=TEMPLATES[int(rng.integers(len(TEMPLATES)))])
        return SyntheticAnomaly(out, box_mask(box, (h, w)), box, self.kind)
