"""The DINOv2 backbone on tiny random-weight checkpoints saved to disk (hidden size 32, 2 layers,
8-px patches), so the real loading, token layout and detector paths run without downloaded weights."""

import numpy as np
import pytest
import torch

from defectlens.backbones import get_backbone
from defectlens.backbones.dinov2 import parse_name
from defectlens.backbones.hf import ModelNotAvailable
from defectlens.models import Detector, create_detector

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "mlp_ratio": 2, "patch_size": 8, "image_size": 32}


def _save(folder, model_class, config) -> str:
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny-dinov2"), transformers.Dinov2Model, transformers.Dinov2Config(**TINY))


@pytest.fixture(scope="module")
def tiny_dinov2_registers(tmp_path_factory):
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
    return _save(tmp_path_factory.mktemp("tiny-dinov2-reg"), transformers.Dinov2WithRegistersModel, config)


def test_names_parse_model_and_layers():
    assert parse_name("dinov2") == (None, (-1,))
    assert parse_name("dinov2@-4,-1") == (None, (-4, -1))
    assert parse_name("dinov2:/models/dinov2-small") == ("/models/dinov2-small", (-1,))
    assert parse_name("dinov2:facebook/dinov2-base@6,12") == ("facebook/dinov2-base", (6, 12))
    assert parse_name("dinov2:/odd@dir/model") == ("/odd@dir/model", (-1,))
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_name("dinov2@last")


def test_grid_shape_levels_and_sides_rounded_to_the_patch(tiny_dinov2, normal_images):
    backbone = get_backbone(f"dinov2:{tiny_dinov2}", 70)  # 70 px -> 9 patches of 8 = 72 px
    assert backbone.input_hw == (72, 72) and backbone.feature_hw == (9, 9)
    assert backbone.levels == ((32, 8),)
    features = backbone.embed(normal_images[:3])
    assert features.shape == (3, 32, 9, 9) and features.dtype == torch.float32
    wide = get_backbone(f"dinov2:{tiny_dinov2}", (40, 100))
    assert wide.input_hw == (40, 96) and wide.embed(normal_images[:1]).shape == (1, 32, 5, 12)


def test_features_are_the_patch_tokens_in_grid_order_without_class_and_registers(tiny_dinov2_registers, normal_images):
    backbone = get_backbone(f"dinov2:{tiny_dinov2_registers}", 48)
    features = backbone.embed(normal_images[:2])
    pixels = backbone.to_tensor(np.stack([backbone.resize(image) for image in normal_images[:2]]))
    with torch.inference_mode():
        tokens = backbone.network(pixel_values=pixels.contiguous()).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 36  # class token, 4 registers, 6×6 patches
    for row, col in ((0, 0), (0, 5), (2, 3), (5, 5)):
        torch.testing.assert_close(features[:, :, row, col], tokens[:, 5 + 6 * row + col])


def test_deterministic_and_independent_of_the_batch(tiny_dinov2, normal_images):
    backbone = get_backbone(f"dinov2:{tiny_dinov2}", 48)
    batch = backbone.embed(normal_images[:5])
    assert torch.equal(batch, backbone.embed(normal_images[:5]))
    torch.testing.assert_close(backbone.embed([normal_images[4]])[0], batch[4], atol=1e-5, rtol=1e-5)


def test_several_layers_concatenate_and_the_last_matches_the_default(tiny_dinov2, normal_images):
    both = get_backbone(f"dinov2:{tiny_dinov2}@1,2", 48)
    assert both.levels == ((32, 8), (32, 8)) and both.feature_dim == 64
    features = both.embed(normal_images[:2])
    assert features.shape == (2, 64, 6, 6)
    last = get_backbone(f"dinov2:{tiny_dinov2}", 48).embed(normal_images[:2])
    torch.testing.assert_close(features[:, 32:], last, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[:, :32], last)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        get_backbone(f"dinov2:{tiny_dinov2}@3", 48)


def test_patchknn_through_the_backbone_name_finds_the_defect(tiny_dinov2, normal_images, defect_image, tmp_path,
                                                             monkeypatch):
    """AnomalyDINO = patch kNN on DINOv2; the model named by the environment variable."""
    monkeypatch.setenv("DEFECTLENS_DINOV2_MODEL", tiny_dinov2)
    detector = create_detector("patchknn", backbone="dinov2", size=64).fit(normal_images[:5])
    prediction = detector.predict([normal_images[5], defect_image])
    assert prediction.maps[1].shape == defect_image.shape[:2]
    assert prediction.scores[1] > prediction.scores[0]
    hot = np.unravel_index(np.argmax(prediction.maps[1]), prediction.maps[1].shape)
    assert 70 <= hot[0] <= 110 and 20 <= hot[1] <= 60  # the bright square is at rows 80-100, cols 30-50
    detector.save(tmp_path / "dino.dlmodel")
    reloaded = Detector.load(tmp_path / "dino.dlmodel")
    np.testing.assert_allclose(reloaded.predict([defect_image]).scores, prediction.scores[1:], rtol=1e-5)


def test_missing_weights_give_one_line_saying_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTLENS_DINOV2_MODEL", raising=False)
    with pytest.raises(ModelNotAvailable, match="DEFECTLENS_DINOV2_MODEL") as error:
        get_backbone("dinov2", 64)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelNotAvailable, match="neither a folder on this machine nor in the Hugging Face cache") as error:
        get_backbone(f"dinov2:{tmp_path / 'no-such-model'}", 64)
    assert "--backbone dinov2:PATH" in str(error.value) and "\n" not in str(error.value)
    vit = _save(tmp_path / "vit", transformers.ViTModel,
                transformers.ViTConfig(**{k: v for k, v in TINY.items() if k != "mlp_ratio"}))
    with pytest.raises(ModelNotAvailable, match="holds a 'vit' model, not DINOv2"):
        get_backbone(f"dinov2:{vit}", 64)
