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


def test_a_backbone_that_frees_its_memory_after_each_batch_computes_the_same_features(export_dir, normal_images):
    held, freed = open_exported(export_dir), open_exported(export_dir, hold_memory=False)
    assert held.hold_memory and not freed.hold_memory
    if held.runtime == "onnx":
        assert held.session.get_session_options().enable_cpu_mem_arena
        assert not freed.session.get_session_options().enable_cpu_mem_arena
    np.testing.assert_array_equal(freed.embed(normal_images[:5]).numpy(), held.embed(normal_images[:5]).numpy())


def test_an_export_of_named_stages_computes_those_stages(normal_images, tmp_path):
    pytest.importorskip("onnxruntime")
    name = "efficientnet-lite0@2,4,5"
    export_dir = export_backbone(name, SIZE, tmp_path / "onnx", "onnx")
    exported = open_exported(export_dir)
    assert exported.levels == ((40, 8), (112, 16), (192, 32)) and read_spec(export_dir)["backbone"] == name
    reference = get_backbone(name, SIZE).embed(normal_images[:2]).numpy()
    assert np.abs(exported.embed(normal_images[:2]).numpy() - reference).max() <= FEATURE_TOLERANCE

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


def test_export_overwrite_replaces_an_earlier_export_only(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from defectlens.errors import OutputError

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's")
    (tmp_path / "a file").write_text("the user's")
    for target in (folder, tmp_path / "a file"):  # checked before the graph is built
        with pytest.raises(OutputError, match="keep.txt" if target == folder else "is a file"):
            export_backbone("efficientnet-lite0", SIZE, target, "onnx", overwrite=True)
    monkeypatch.chdir(folder)
    with pytest.raises(OutputError, match="not an earlier export"):
        export_backbone("efficientnet-lite0", SIZE, ".", "onnx", overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a file", "keep.txt", "work"]
    export = export_backbone("efficientnet-lite0", SIZE, tmp_path / "export", "onnx")
    first = (export / "export.json").stat().st_mtime_ns
    assert export_backbone("efficientnet-lite0", SIZE, tmp_path / "export", "onnx", overwrite=True) == export
    assert sorted(p.name for p in export.iterdir()) == ["export.json", "features.onnx"]
    assert (export / "export.json").stat().st_mtime_ns != first


@pytest.fixture()
def cache_with(export_dir, tmp_path, monkeypatch):
    """A private export cache; ``cache_with(detector)`` puts the module's export where the cache
    keeps the export of that detector's backbone (no export made again)."""
    import shutil

    from defectlens.runtime import cached_export

    monkeypatch.setenv("DEFECTLENS_CACHE", str(tmp_path / "cache"))

    def place(detector):
        shutil.copytree(export_dir, cached_export(detector, read_spec(export_dir)["format"]))
    return place


def test_a_broken_export_is_a_clear_error_and_a_broken_cached_one_is_made_again(cache_with, export_dir, tmp_path,
                                                                                  normal_images, capsys):
    import shutil

    from defectlens.runtime import BrokenExportError, cached_export
    from defectlens.runtime.spec import GRAPH_FILES

    runtime = read_spec(export_dir)["format"]
    detector = create_detector("patchcore", size=SIZE).fit(normal_images[:3])
    expected = detector.predict(normal_images[3:5]).scores
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / GRAPH_FILES[runtime]).write_bytes(b"cut short")
    with pytest.raises(BrokenExportError, match="graph cannot be loaded"):
        load_runtime(detector, runtime, export_dir=broken)
    (broken / "export.json").write_text("{not json")
    with pytest.raises(BrokenExportError, match="not valid JSON"):
        load_runtime(detector, runtime, export_dir=broken)
    cache_with(detector)
    (cached_export(detector, runtime) / GRAPH_FILES[runtime]).write_bytes(b"cut short")
    capsys.readouterr()
    load_runtime(detector, runtime)
    assert "the cached export is made again" in capsys.readouterr().err
    np.testing.assert_allclose(detector.predict(normal_images[3:5]).scores, expected, rtol=SCORE_RTOL)


def test_fit_auto_embeds_on_a_cached_export_with_the_pytorch_fit_bank_and_threshold(cache_with, export_dir, tmp_path,
                                                                                  normal_images, defect_image):
    from PIL import Image

    from defectlens.engine.fit import fit_from_folder
    from defectlens.runtime import runtime_of

    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(normal_images):
        Image.fromarray(image).save(folder / f"{i}.png")
    reference, _ = fit_from_folder(folder, params={"size": SIZE}, runtime="torch")
    # An empty cache: "auto" keeps PyTorch rather than pay for an export.
    detector, _ = fit_from_folder(folder, params={"size": SIZE}, runtime="auto")
    assert runtime_of(detector) == "torch" and not (tmp_path / "cache").exists()
    cache_with(detector)
    detector, _ = fit_from_folder(folder, params={"size": SIZE}, runtime="auto")
    assert runtime_of(detector) == read_spec(export_dir)["format"]
    assert not detector.backbone_network.hold_memory  # a fit embeds once: nothing held between batches
    # Every patch kept (6 images × 8 × 8 < bank_size): the banks agree to the features' tolerance.
    assert detector.bank.shape == reference.bank.shape
    assert (detector.bank - reference.bank).abs().max() <= FEATURE_TOLERANCE
    assert detector.threshold == pytest.approx(reference.threshold, rel=SCORE_RTOL)
    np.testing.assert_allclose(detector.normal_scores, reference.normal_scores, rtol=SCORE_RTOL)


def test_the_service_runs_its_models_on_the_runtime_it_is_given(cache_with, export_dir, tmp_path, normal_images,
                                                                defect_image):
    from concurrent.futures import ThreadPoolExecutor

    from defectlens.runtime import runtime_of
    from defectlens.serve.inspection import LoadedModel

    path = create_detector("patchcore", size=SIZE).fit(normal_images).save(tmp_path / "m.dlmodel")
    torch_model = LoadedModel.load("m", path)
    cache_with(torch_model.detector)
    model = LoadedModel.load("m", path, runtime=read_spec(export_dir)["format"])
    assert runtime_of(model.detector) == read_spec(export_dir)["format"] and runtime_of(torch_model.detector) == "torch"
    images = [*normal_images[:2], defect_image]
    expected = torch_model.detector.predict(images).scores
    # Several service workers share one detector: every thread gets the same scores.
    with ThreadPoolExecutor(3) as pool:
        for scores in pool.map(lambda _: model.detector.predict(images).scores, range(6)):
            # The two normal images were trained on: distance 0 in PyTorch, ~1e-4 through the export.
            np.testing.assert_allclose(scores, expected, rtol=SCORE_RTOL, atol=1e-3)
