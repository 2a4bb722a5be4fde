"""The compositional prompt ensemble of WinCLIP (Jeong et al., CVPR 2023, supplementary).

Every state word phrase is put into every template: 7 normal states × 22 templates = 154
prompts describe a good object, 4 anomalous states × 22 templates = 88 a defective one.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

#: Used when neither the user nor the dataset names the object.
GENERIC_OBJECT = "object"


def object_name(category: str | None) -> str:
    """A dataset category as words for the prompts: "ball_screw" -> "ball screw"."""
    words = " ".join((category or "").replace("_", " ").replace("-", " ").split())
    return words or GENERIC_OBJECT


def prompts(states: tuple[str, ...], name: str) -> list[str]:
    """Every state of ``name`` in every template."""
    return [template.format(state.format(name)) for state in states for template in TEMPLATES]
