"""Hugging Face models (CLIP, DINOv2, SAM, Stable Diffusion) from a local folder or the user's HF cache.

defectlens never downloads weights: ``local_files_only`` is always on. A missing model gives
:class:`ModelNotAvailable`, one message naming the model and how to provide it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from ..errors import DefectlensError

# Which environment variable names the default of each family, a checkpoint to suggest, and the
# option that names a folder per command.
FAMILIES = {
    "clip": ("DEFECTLENS_CLIP_MODEL", "openai/clip-vit-base-patch16", "--param clip_model=PATH"),
    "dinov2": ("DEFECTLENS_DINOV2_MODEL", "facebook/dinov2-small", "--backbone dinov2:PATH"),
    "sam": ("DEFECTLENS_SAM_MODEL", "facebook/sam-vit-base", "--param sam_model=PATH"),
    "sd": ("DEFECTLENS_SD_MODEL", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--param sd_model=PATH"),
}
#: The DINOv2 architectures of transformers, by the ``model_type`` of their config.json.
DINOV2_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}


class ModelNotAvailable(DefectlensError, RuntimeError):
    """Weights a method needs are not on this machine (defectlens does not download them)."""


def _how_to(family: str) -> str:
    variable, example, option = FAMILIES[family]
    return (f"download it once where you have internet (e.g. `huggingface-cli download {example} --local-dir "
            f"models/{example.split('/')[-1]}`), then pass its folder with {option} "
            f"or set {variable}=PATH")


def _unavailable(family: str, label: str, source: str, error: Exception) -> ModelNotAvailable:
    """The one-line error for weights that did not load from ``source``."""
    if Path(source).exists():
        problem = f"{label} folder '{source}' could not be loaded ({str(error).splitlines()[0]})"
    else:  # transformers' own message here is about hub ids or the network, which misleads offline
        problem = f"{label} model '{source}' is neither a folder on this machine nor in the Hugging Face cache"
    return ModelNotAvailable(f"{problem}; {_how_to(family)}")


def resolve_model(family: str, model: str | os.PathLike | None) -> str:
    """The folder or hub id to load: the argument, else the family's environment variable."""
    variable = FAMILIES[family][0]
    chosen = model or os.environ.get(variable)
    if not chosen:
        raise ModelNotAvailable(f"no {family.upper()} model given: {_how_to(family)}")
    return str(chosen)


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ModelNotAvailable("this method needs the `transformers` package: pip install 'defectlens[hf]'") from None
    return transformers


@lru_cache(maxsize=2)
def load_clip(model: str | None = None):
    """(CLIPModel in eval mode, CLIPTokenizer or CLIPTokenizerFast) from a folder or the HF cache."""
    source = resolve_model("clip", model)
    transformers = _require_transformers()
    try:
        clip = transformers.CLIPModel.from_pretrained(source, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _unavailable("clip", "CLIP", source, error) from None
    return clip.eval(), tokenizer


@lru_cache(maxsize=2)
def load_sam(model: str | None = None):
    """SamModel in eval mode from a folder or the HF cache (used by the composition detector)."""
    source = resolve_model("sam", model)
    transformers = _require_transformers()
    try:
        sam = transformers.SamModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _unavailable("sam", "SAM", source, error) from None
    return sam.eval()


@lru_cache(maxsize=2)
def load_dinov2(model: str | None = None):
    """Dinov2Model or Dinov2WithRegistersModel in eval mode from a folder or the HF cache (the
    class follows the checkpoint's config: any patch size, with or without register tokens)."""
    source = resolve_model("dinov2", model)
    transformers = _require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _unavailable("dinov2", "DINOv2", source, error) from None
    if config.model_type not in DINOV2_CLASSES:
        raise ModelNotAvailable(f"'{source}' holds a '{config.model_type}' model, not DINOv2 "
                                f"({' or '.join(DINOV2_CLASSES)}); {_how_to('dinov2')}")
    try:
        network = getattr(transformers, DINOV2_CLASSES[config.model_type]).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, AttributeError) as error:
        raise _unavailable("dinov2", "DINOv2", source, error) from None
    return network.eval()
