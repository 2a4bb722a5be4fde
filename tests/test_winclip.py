"""WinCLIP / WinCLIP+ on a tiny random-weight CLIP saved to disk and loaded through load_clip,
so the real loading, window, text and fusion code paths run without downloaded weights."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from defectlens.cli import main
from defectlens.models import Detector, create_detector
from defectlens.models.winclip.encoder import CLIP_MEAN, CLIP_STD, WindowEncoder
from defectlens.models.winclip.prompts import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    object_name,
    prompts,
)
from defectlens.models.winclip.windows import (
    association_scores,
    harmonic_aggregation,
    harmonic_mean,
    two_class_scores,
    window_cover,
    window_patches,
)

transformers = pytest.importorskip("transformers")

SIZE = 48  # 6×6 patches of 8 px: 25 windows of 2×2, 16 of 3×3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(5)]


# -- prompts and score arithmetic: known answers ------------------------------------------------
def test_prompt_ensemble_is_every_state_in_every_template():
    assert len(TEMPLATES) == 22 and len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 4
    normal, anomalous = prompts(NORMAL_STATES, "ball screw"), prompts(ANOMALOUS_STATES, "ball screw")
    assert len(set(normal)) == 154 and len(set(anomalous)) == 88
    assert "a photo of the flawless ball screw for visual inspection." in normal
    assert "a cropped photo of the ball screw without damage." in normal
    assert "a jpeg corrupted photo of a damaged ball screw." in anomalous
    assert "a photo of a small ball screw with defect." in anomalous
    assert object_name("ball_screw") == "ball screw" and object_name("metal-nut") == "metal nut"
    assert object_name(None) == object_name("") == "object"


def test_window_masks_cover_exactly_their_patches():
    height, width, k = 4, 5, 2
    windows = window_patches(height, width, k)
    cover = window_cover(windows, height * width)
    assert cover.shape == ((height - k + 1) * (width - k + 1), height * width)
    for index, (top, left) in enumerate((t, l) for t in range(height - k + 1) for l in range(width - k + 1)):
        expected = {(top + dy) * width + left + dx for dy in range(k) for dx in range(k)}
        assert set(cover[index].nonzero().flatten().tolist()) == expected
    # The paper's window counts at ViT-B/16, 240 px (15×15 patches).
    assert len(window_patches(15, 15, 2)) == 196 and len(window_patches(15, 15, 3)) == 169
    with pytest.raises(ValueError, match="does not fit"):
        window_patches(2, 2, 3)


def test_harmonic_aggregation_known_answer():
    # 3×3 grid, four 2×2 windows scored 1, 2, 4, 4 (top-left, top-right, bottom-left, bottom-right).
    patch_map = harmonic_aggregation(torch.tensor([[1.0, 2.0, 4.0, 4.0]]), window_patches(3, 3, 2), 9)
    expected = torch.tensor([[1, 4 / 3, 2], [8 / 5, 2, 8 / 3], [4, 4, 4]])
    assert torch.allclose(patch_map.view(3, 3), expected)
    # A window scored 0 (perfectly normal) makes every patch it covers 0.
    zero = harmonic_aggregation(torch.tensor([[0.0, 2.0, 4.0, 4.0]]), window_patches(3, 3, 2), 9).view(3, 3)
    assert zero[0, 0] == zero[1, 1] == 0 and zero[2, 2] == 4
    assert torch.isclose(harmonic_mean(torch.tensor([1.0, 2.0, 4.0])), torch.tensor(12 / 7))


def test_association_score_known_answers():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    diagonal = (e1 + e2) / math.sqrt(2)
    queries = torch.stack([e1, e2, -e1, diagonal])
    assert torch.allclose(association_scores(queries, torch.stack([e1, e2])), torch.tensor([0, 0, 0.5, (1 - 1 / math.sqrt(2)) / 2]))
    assert torch.allclose(association_scores(queries, e1[None]), torch.tensor([0, 0.5, 1, (1 - 1 / math.sqrt(2)) / 2]))
    # chunking the queries changes nothing
    assert torch.equal(association_scores(queries, e1[None], block=1), association_scores(queries, e1[None]))


def test_two_class_scores():
    prototypes = torch.eye(2)  # normal, anomalous
    between = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    assert torch.allclose(two_class_scores(between, prototypes, 100.0), torch.tensor([0.5]))
    assert two_class_scores(prototypes, prototypes, 100.0).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


# -- the CLIP window encoder ---------------------------------------------------------------
def test_window_embedding_attends_only_to_its_patch_tokens(tiny_clip, parts):
    from defectlens.backbones.hf import load_clip

    clip, _ = load_clip(tiny_clip)
    encoder = WindowEncoder(clip, SIZE, [2, 3])
    grid = encoder.grid
    assert grid == 6 and {k: len(w) for k, w in encoder.windows.items()} == {2: 25, 3: 16}
    base = encoder.encode([parts[0]])

    # Parity: dropping the other tokens == masking them out of attention in the full sequence.
    pixels = torch.from_numpy(encoder.preprocess(parts[0]))[None]
    vision = clip.vision_model
    with torch.no_grad():
        tokens = vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))
        for k, windows in encoder.windows.items():
            index = 7 if k == 2 else 5
            allowed = torch.zeros(tokens.shape[1], dtype=torch.bool)
            allowed[0] = True
            allowed[windows[index] + 1] = True
            mask = torch.zeros(1, 1, tokens.shape[1], tokens.shape[1]).masked_fill(~allowed, float("-inf"))
            masked = vision.encoder(inputs_embeds=tokens, attention_mask=mask).last_hidden_state[:, 0]
            expected = torch.nn.functional.normalize(clip.visual_projection(vision.post_layernorm(masked)), dim=-1)
            assert torch.allclose(base.windows[k][0, index], expected[0], atol=1e-5)

    # Pixels outside a window's patches do not change its embedding; inside they do.
    changed = parts[0].copy()
    changed[:, :28] = 255 - changed[:, :28]  # left half of the 56 px wide image = left 3 of 6 patch columns
    after = encoder.encode([changed])
    windows = encoder.windows[2]
    right_only = (windows % grid >= 3).all(dim=1)
    assert right_only.sum() == 10
    assert torch.allclose(after.windows[2][0, right_only], base.windows[2][0, right_only], atol=1e-5)
    assert not torch.allclose(after.windows[2][0, ~right_only], base.windows[2][0, ~right_only], atol=1e-3)


def test_whole_image_embedding_matches_clip(tiny_clip, parts):
    """At CLIP's own input size the image scale is CLIP's image embedding."""
    from defectlens.backbones.hf import load_clip

    clip, _ = load_clip(tiny_clip)
    encoder = WindowEncoder(clip, 32, [2, 3])
    pixels = torch.from_numpy(encoder.preprocess(parts[1]))[None]
    with torch.no_grad():
        reference = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    assert torch.allclose(encoder.encode([parts[1]]).image, torch.nn.functional.normalize(reference, dim=-1), atol=1e-5)
    # preprocessing: CLIP's normalisation of the whole (squashed, not cropped) image
    flat = np.full((10, 20, 3), 255, np.uint8)
    assert np.allclose(encoder.preprocess(flat)[:, 0, 0], (1 - CLIP_MEAN) / CLIP_STD)


# -- the detector end to end ---------------------------------------------------------------
def test_zero_shot_fit_predict_save_load(tiny_clip, parts, tmp_path):
    detector = create_detector("winclip", clip_model=tiny_clip, object_name="ball_screw", size=SIZE).fit([])
    assert detector.threshold is None and detector.banks is None
    assert detector.object_name == "ball_screw" and detector.object_name_ == "ball screw"
    mixed = [parts[0], parts[1][:32, :48]]
    prediction = detector.predict(mixed)
    assert isinstance(prediction.maps, list) and [m.shape for m in prediction.maps] == [(40, 56), (32, 48)]
    assert np.all((prediction.scores > 0) & (prediction.scores < 1))

    # The map is the harmonic mean of the image score and the two window scales.
    features = detector.encoder.encode(parts[:1])
    _, patch_map = detector.score_features(features, None)
    image_score = two_class_scores(features.image, detector.prototypes, 1 / 0.07)
    small = harmonic_aggregation(two_class_scores(features.windows[2], detector.prototypes, 1 / 0.07),
                                 window_patches(6, 6, 2), 36)
    mid = harmonic_aggregation(two_class_scores(features.windows[3], detector.prototypes, 1 / 0.07),
                               window_patches(6, 6, 3), 36)
    assert torch.allclose(patch_map, 3 / (1 / image_score[:, None] + 1 / small + 1 / mid))
    assert prediction.scores[0] == pytest.approx(float(image_score[0]), abs=1e-6)

    path = detector.save(tmp_path / "zero.dlmodel")
    loaded = Detector.load(path)
    again = loaded.predict(mixed)
    assert np.allclose(again.scores, prediction.scores, atol=1e-6)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(again.maps, prediction.maps))


def test_softmax_scale_reference_or_the_clips_logit_scale(tiny_clip, parts):
    """The reference's 1/0.07 by default; null takes CLIP's logit scale (100 for OpenAI's
    checkpoints: set here, a random CLIP starts at 1/0.07). The image probability is a sigmoid of
    the scaled cosine difference, so the scale keeps the image ranking and changes the maps."""
    reference = create_detector("winclip", clip_model=tiny_clip, size=SIZE).fit([])
    clip_scale = create_detector("winclip", clip_model=tiny_clip, size=SIZE, softmax_scale=None).fit([])
    clip_scale.temperature = 100.0  # what a trained OpenAI CLIP's logit_scale.exp() gives
    features = reference.encoder.encode(parts)
    cosines = features.image @ reference.prototypes.T
    for detector, scale in ((reference, 1 / 0.07), (clip_scale, 100.0)):
        scores, _ = detector.score_features(features, None)
        torch.testing.assert_close(scores, torch.sigmoid(scale * (cosines[:, 1] - cosines[:, 0])))
    ranks = [np.argsort(d.score_features(features, None)[0].numpy()) for d in (reference, clip_scale)]
    np.testing.assert_array_equal(*ranks)
    assert not torch.allclose(reference.score_features(features, None)[1], clip_scale.score_features(features, None)[1])


def test_winclip_plus_fit_predict_save_load(tiny_clip, parts, tmp_path):
    shots, others = parts[:3], parts[3:]
    detector = create_detector("winclip", clip_model=tiny_clip, object_name="ball_screw", size=SIZE).fit(shots)
    assert detector.normal_scores.shape == (3,) and detector.threshold is not None
    assert detector.map_range[0] < detector.map_range[1]
    assert set(detector.banks) == {"window2", "window3", "patch"}
    assert detector.banks["window2"].shape == (3 * 25, 16) and detector.banks["patch"].shape == (3 * 36, 32)

    zero_shot = create_detector("winclip", clip_model=tiny_clip, object_name="ball_screw", size=SIZE).fit([])
    language = zero_shot.predict(parts)
    fused = detector.predict(parts)
    # A memorised image has visual association 0 everywhere: score and map are half the language ones.
    assert np.allclose(fused.scores[:3], language.scores[:3] / 2, atol=1e-5)
    assert np.allclose(fused.maps[:3], language.maps[:3] / 2, atol=1e-5)
    # An unseen image adds a positive visual term.
    assert np.all(fused.scores[3:] > language.scores[3:] / 2 + 1e-4)

    path = detector.save(tmp_path / "plus.dlmodel")
    loaded = Detector.load(path)
    assert loaded.threshold == detector.threshold and loaded.map_range == detector.map_range
    again = loaded.predict(others)
    assert np.allclose(again.scores, fused.scores[3:], atol=1e-6) and np.allclose(again.maps, fused.maps[3:], atol=1e-6)


def test_loaded_model_refuses_a_different_clip(tiny_clip, parts, tmp_path):
    from defectlens.backbones.hf import ModelNotAvailable

    detector = create_detector("winclip", clip_model=tiny_clip, size=SIZE).fit([])
    path = detector.save(tmp_path / "zero.dlmodel")
    other = tmp_path / "other-clip"
    clip = transformers.CLIPModel.from_pretrained(tiny_clip)
    with torch.no_grad():
        clip.visual_projection.weight.mul_(2)
    clip.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tiny_clip).save_pretrained(other)
    loaded = Detector.load(path)
    loaded.set_params(clip_model=str(other))
    with pytest.raises(ModelNotAvailable, match="not the one this winclip model was fitted with"):
        loaded.predict(parts[:1])


# -- command line --------------------------------------------------------------------------
def test_cli_fit_without_clip_weights_is_one_clear_line(synthetic_mvtec, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEFECTLENS_CLIP_MODEL", raising=False)
    model = tmp_path / "m.dlmodel"
    assert main(["fit", str(synthetic_mvtec), "--method", "winclip", "-o", str(model)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "no CLIP model given" in lines[0] and "--param clip_model=PATH" in lines[0] and "DEFECTLENS_CLIP_MODEL" in lines[0]
    assert not model.exists()

    missing = tmp_path / "no-such-clip"
    assert main(["fit", str(synthetic_mvtec), "--method", "winclip", "-o", str(model), "--param", f"clip_model={missing}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "neither a folder on this machine nor in the Hugging Face cache" in lines[0]


def test_cli_fit_predict_benchmark_with_tiny_clip(tiny_clip, synthetic_mvtec, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTLENS_CLIP_MODEL", tiny_clip)  # the environment variable path
    model = tmp_path / "zero.dlmodel"
    assert main(["fit", str(synthetic_mvtec), "--method", "winclip", "--shots", "0", "--size", str(SIZE), "-o", str(model)]) == 0
    assert Detector.load(model).object_name == "washer"  # the dataset's category
    plus = tmp_path / "plus.dlmodel"
    assert main(["fit", str(synthetic_mvtec), "--method", "winclip", "--shots", "3", "--size", str(SIZE), "-o", str(plus)]) == 0
    out = tmp_path / "scores.csv"
    assert main(["predict", str(plus), str(synthetic_mvtec / "test"), "--csv", str(out), "--maps", str(tmp_path / "maps")]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(r["score"]) > 0 and r["label"] in ("normal", "anomalous") for r in rows)

    report = tmp_path / "bench.json"
    assert main(["benchmark", str(synthetic_mvtec), "--method", "winclip", "--shots", "0,2", "--seeds", "1",
                 "--size", str(SIZE), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert [run["shots"] for run in result["runs"]] == [0, 2] and result["params"]["object_name"] == "washer"
    assert all(0 <= run["metrics"]["all"]["image_auroc"] <= 1 for run in result["runs"])
