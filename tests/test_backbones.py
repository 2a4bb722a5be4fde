"""Backbone names: EfficientNet-Lite stages chosen after '@' give the features of those stages."""

import numpy as np
import pytest
import torch

from defectlens.backbones import efficientnet_lite, get_backbone, is_backbone_name
from defectlens.models import create_detector
from defectlens.models.params import ParameterError

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def test_named_stages_are_the_default_stages_plus_the_added_ones(normal_images):
    images = normal_images[:2]
    default = get_backbone("efficientnet-lite0", SIZE)
    same = get_backbone("efficientnet-lite0@2,4", SIZE)
    wider = get_backbone("efficientnet-lite0@2,4,5", SIZE)
    assert default.levels == same.levels == ((40, 8), (112, 16))
    assert wider.levels == ((40, 8), (112, 16), (192, 32)) and wider.feature_dim == 344
    reference = default.embed(images)
    torch.testing.assert_close(same.embed(images), reference, rtol=0, atol=0)
    features = wider.embed(images)
    assert features.shape == (2, 344, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(features[:, :152], reference, rtol=0, atol=1e-6)


def test_folded_network_computes_the_pretrained_networks_features(normal_images, monkeypatch):
    """The backbone runs the pretrained network with its batch norms folded into the convolutions
    and symmetric pads moved into them: the features are the unfolded network's, to float rounding,
    also at a size whose grids are odd."""
    folded = efficientnet_lite.EfficientNetLite("efficientnet-lite0@1,2,4", (48, 88))
    monkeypatch.setattr(efficientnet_lite, "_fold_for_inference", lambda network: None)
    plain = efficientnet_lite.EfficientNetLite("efficientnet-lite0@1,2,4", (48, 88))
    def batch_norms(backbone):
        return sum(isinstance(module, torch.nn.BatchNorm2d) for module in [*backbone.stem.modules(), *backbone.blocks.modules()])
    assert batch_norms(folded) == 0 and batch_norms(plain) > 0
    batch = folded.to_tensor(np.stack([folded.resize(image) for image in normal_images[:2]]))
    with torch.inference_mode():
        expected = plain.forward(batch)
        torch.testing.assert_close(folded.forward(batch), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_the_finest_named_stage_sets_the_feature_grid(normal_images):
    backbone = get_backbone("efficientnet-lite0@1,2", SIZE)
    assert backbone.stride == 4 and backbone.levels == ((24, 4), (40, 8))
    assert backbone.embed(normal_images[:1]).shape == (1, 64, SIZE // 4, SIZE // 4)


@pytest.mark.parametrize("name, problem", [("efficientnet-lite0@4,2", "increasing"), ("efficientnet-lite0@2,2", "increasing"),
                                           ("efficientnet-lite0@x", "increasing"), ("efficientnet-lite0@", "increasing"),
                                           ("efficientnet-lite0@2,9", "stage 9 does not exist"),
                                           ("efficientnet-lite7", "unknown backbone")])
def test_bad_stage_names_say_what_is_wrong(name, problem):
    with pytest.raises(ValueError, match=problem):
        get_backbone(name, SIZE)


def test_detectors_accept_stage_names_and_refuse_malformed_ones(normal_images):
    assert is_backbone_name("efficientnet-lite0@2,3,4") and not is_backbone_name("efficientnet-lite0@3,2")
    assert not is_backbone_name("efficientnet-lite0@2,7")  # stages 0 to 6: refused before anything is built
    detector = create_detector("padim", backbone="efficientnet-lite0@2,3,4", size=SIZE).fit(normal_images)
    assert detector.backbone_network.feature_dim == 40 + 80 + 112
    with pytest.raises(ParameterError, match="backbone"):
        create_detector("padim", backbone="efficientnet-lite0@3,2", size=SIZE).fit(normal_images)
