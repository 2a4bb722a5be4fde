"""Exported runtimes: features, scores, maps and labels match PyTorch for every exportable method."""

import numpy as np
import pytest

from defectlens.errors import UsageError
from defectlens.backbones import get_backbone
from defectlens.models import create_detector
from defectlens.runtime import (EXPORTABLE_METHODS, FEATURE_TOLERANCE, NotExportableError, check_exportable, export_backbone,
                                load_runtime, open_exported, read_spec)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64  # smallest input with a whole stride-16 grid around the 3×3 pooling; keeps exports to seconds
# Scores and maps: relative to their scale. Features differ by ~1e-5 (float32 kernels reordered).
SCORE_RTOL = 1e-3


@pytest.fixture(scope="module", params=["onnx", "openvino"])
def export_dir(request, tmp_path_factory):
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[request.param])
    return export_backbone("efficientnet-lite0", SIZE, tmp_path_factory.mktemp("export") / request.param, request.param)


def test_exported_features_match_pytorch(export_dir, normal_images, defect_image):
    images = normal_images[:3] + [defect_image]
    reference = get_backbone("efficientnet-lite0", SIZE).embed(images).numpy()
    exported = open_exported(export_dir)
    assert (exported.input_hw, exported.levels, exported.feature_dim) == ((SIZE, SIZE), ((40, 8), (112, 16)), 152)
    features = exported.embed(images).numpy()
    assert features.shape == reference.shape
    assert np.abs(features - reference).max() <= FEATURE_TOLERANCE
    assert read_spec(export_dir)["max_feature_difference"] <= FEATURE_TOLERANCE


@pytest.mark.parametrize("method", EXPORTABLE_METHODS)
def test_every_exportable_method_scores_the_same_on_the_export(method, export_dir, normal_images, defect_image):
    params = {"parts": 3} if method == "composition" else {}
    detector = create_detector(method, size=SIZE, **params).fit(normal_images)
    images = normal_images[:2] + [defect_image]
    expected = detector.predict(images)
    exported = load_runtime(detector, read_spec(export_dir)["format"], export_dir=export_dir)
    assert exported.backbone_network.runtime == read_spec(export_dir)["format"]
    got = exported.predict(images)
    scale = np.abs(expected.scores).max()
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_RTOL * scale)
    np.testing.assert_allclose(np.asarray(got.maps), np.asarray(expected.maps), rtol=0,
                               atol=SCORE_RTOL * np.abs(np.asarray(expected.maps)).max())
    if detector.threshold is not None:
        assert (got.labels(detector.threshold) == expected.labels(detector.threshold)).all()


def test_methods_that_cannot_be_exported_say_why(tmp_path):
    with pytest.raises(NotExportableError, match="musc.*aspect ratio"):
        check_exportable(create_detector("musc", size=SIZE))
    with pytest.raises(NotExportableError, match="gcad"):
        load_runtime(create_detector("gcad", size=SIZE), "onnx", export_dir=tmp_path)
    # "auto" keeps such a method on PyTorch instead of failing.
    detector = create_detector("musc", size=SIZE)
    assert load_runtime(detector, "auto") is detector and detector._backbone is None


def test_export_refuses_to_overwrite_and_mismatched_exports_are_an_error(export_dir, normal_images):
    with pytest.raises(FileExistsError):
        export_backbone("efficientnet-lite0", SIZE, export_dir, read_spec(export_dir)["format"])
    detector = create_detector("padim", size=2 * SIZE)
    with pytest.raises(ValueError, match="the model needs"):
        load_runtime(detector, read_spec(export_dir)["format"], export_dir=export_dir)
    with pytest.raises(UsageError, match="not a defectlens export"):
        load_runtime(detector, "onnx", export_dir=export_dir.parent)
