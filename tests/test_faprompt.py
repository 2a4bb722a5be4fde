"""FAPrompt on a tiny random-weight CLIP built here: the real loading, training and inference
code runs end to end; no CLIP weights are downloaded."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import write_tiny_clip

from defectlens.backbones.hf import load_clip
from defectlens.cli import main
from defectlens.data.generator import generate
from defectlens.models import Detector, ModelFileError, create_detector
from defectlens.models.faprompt import losses
from defectlens.models.faprompt.clip import (
    _value_attention,
    encode_images,
    encode_prompts,
    word_embeddings,
)
from defectlens.models.faprompt.model import FAPrompt, mask_target, training_loss
from defectlens.models.faprompt.prompts import FinePrompts, Scores

TINY = {"size": 32, "top_patches": 4, "prompts": 3, "steps": 12, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tiny_prompt_clip):
    return tiny_prompt_clip


@pytest.fixture(scope="module")
def aux_and_target(tmp_path_factory):
    """Two generated categories: washer is the annotated auxiliary set, fabric the unseen one."""
    out = tmp_path_factory.mktemp("faprompt-data")
    washer, fabric = generate(out, kind="mvtec", seed=5, size=64, n_train=6, n_test_good=4, n_test_defect_per_type=1,
                              categories=["washer", "fabric"])
    return washer, fabric


@pytest.fixture(scope="module")
def trained(tiny_clip, aux_and_target, tmp_path_factory):
    from defectlens.engine.fit import fit_from_folder

    detector, training = fit_from_folder(aux_and_target[0], method="faprompt", params={**TINY, "clip_model": tiny_clip})
    paths = training.images
    path = detector.save(tmp_path_factory.mktemp("model") / "prompts.dlmodel")
    return detector, paths, path


# -- missing weights ------------------------------------------------------------------------------
def test_fit_without_clip_weights_is_one_clear_error(aux_and_target, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEFECTLENS_CLIP_MODEL", raising=False)
    output = tmp_path / "m.dlmodel"
    assert main(["fit", str(aux_and_target[0]), "--method", "faprompt", "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert "no CLIP model given" in error and "--param clip_model=PATH" in error and "DEFECTLENS_CLIP_MODEL" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1 and not output.exists()

    missing = tmp_path / "no-such-clip"
    assert main(["fit", str(aux_and_target[0]), "--method", "faprompt", "-o", str(output), "--param", f"clip_model={missing}"]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "huggingface-cli download" in error and "Traceback" not in error


# -- CLIP run layer by layer matches transformers ---------------------------------------------------
def test_layerwise_clip_matches_transformers(tiny_clip):
    clip, tokenizer = load_clip(tiny_clip)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image, patches = encode_images(clip, pixels, [1, 2])
    with torch.no_grad():
        reference = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        assert torch.allclose(image, reference, atol=1e-5)
        assert patches.shape == (2, 2, 16, 16) and torch.allclose(patches.norm(dim=-1), torch.ones(2, 2, 16))
        ids = tokenizer(["damaged object."], return_tensors="pt")["input_ids"]
        text = encode_prompts(clip, word_embeddings(clip, tokenizer, "damaged object.")[None])
        assert torch.allclose(text, clip.get_text_features(input_ids=ids).pooler_output, atol=1e-5)

        # V-V attention = CLIP attention whose query and key projections are its value projection.
        attention = clip.vision_model.encoder.layers[0].self_attn
        values_only = copy.deepcopy(attention)
        values_only.q_proj.load_state_dict(attention.v_proj.state_dict())
        values_only.k_proj.load_state_dict(attention.v_proj.state_dict())
        hidden = torch.randn(2, 17, 32)
        assert torch.allclose(_value_attention(attention, hidden), values_only(hidden)[0], atol=1e-5)


# -- losses and fusion: known answers ----------------------------------------------------------
def test_losses_and_scores_known_answers():
    target = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert losses.focal(target, target) < 1e-5 and losses.dice(target, target) < 1e-6
    assert losses.focal(1 - target, target) > 5 and losses.dice(1 - target, target) == pytest.approx(1 - 1 / 5)
    assert losses.dice(torch.zeros(1, 4), torch.zeros(1, 4)) == 0  # an empty mask predicted empty is perfect
    assert losses.orthogonality(torch.eye(3)) == 0
    assert losses.orthogonality(torch.ones(3, 4)) == pytest.approx(3.0)  # 3 pairs, |cos| = 1
    omega = torch.tensor([[1.0, 3.0], [5.0, 5.0]])
    assert losses.prior(omega, torch.tensor([0, 1])) == pytest.approx(5.0)  # only the normal image counts
    scores = Scores(static=torch.tensor([[0.2, 0.8]]), dynamic=torch.tensor([[0.4, 0.6]]), image=torch.tensor([0.5]),
                    omega=torch.zeros(1, 2), abnormal=torch.zeros(3, 2))
    assert scores.image_score().item() == pytest.approx(0.5 * (0.5 + 0.5 * (0.8 + 0.6)))
    four_maps = (scores.static + 1 - (1 - scores.static) + scores.dynamic + 1 - (1 - scores.dynamic)) / 4
    assert torch.allclose(scores.fused_map(), four_maps)
    quarter = np.zeros((8, 8), np.uint8)
    quarter[:4, :4] = 255
    assert mask_target(quarter, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert mask_target(quarter, 1)[0, 0] == pytest.approx(0.25) and not mask_target((), 3).any()


def test_last_layer_value_maps_are_the_last_layers_v_v_tokens(tiny_clip):
    """layers=[depth]: the maps come from one V-V attention on the last layer's input (the
    authors' last-layer value-value maps), not from a value path through several tapped layers."""
    clip, _ = load_clip(tiny_clip)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    depth = clip.config.vision_config.num_hidden_layers
    _, patches = encode_images(clip, pixels, [depth])
    with torch.no_grad():
        vision = clip.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers[:-1]:
            hidden = layer(hidden, None)
        last = vision.encoder.layers[-1]
        tokens = hidden + _value_attention(last.self_attn, last.layer_norm1(hidden))
        expected = torch.nn.functional.normalize(clip.visual_projection(vision.post_layernorm(tokens[:, 1:])), dim=-1)
    assert patches.shape[1] == 1
    torch.testing.assert_close(patches[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_image_loss_cross_entropy_on_the_abnormality_probability(tiny_clip):
    assert losses.cross_entropy(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0])).item() == pytest.approx(
        -(np.log(0.9) + np.log(0.8)) / 2, rel=1e-5)
    clip, tokenizer = load_clip(tiny_clip)
    torch.manual_seed(0)
    net = FinePrompts(clip, tokenizer, prompts=3, top_patches=4)
    image, patches = encode_images(clip, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), [1, 2])
    masks, labels = torch.zeros(4, 32, 32), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        scores = net(image, patches)
        focal = training_loss(net, image, patches, masks, labels)
        crossed = training_loss(net, image, patches, masks, labels, image_loss="cross_entropy")
    # Only the image-level term differs: focal on s(x) against cross-entropy on s_a(x).
    swap = losses.cross_entropy(scores.image, labels.float()) - losses.focal(scores.image_score(), labels.float())
    assert (crossed - focal).item() == pytest.approx(swap.item(), abs=1e-5)


# -- training ----------------------------------------------------------------------------------------
def test_training_steps_lower_the_loss_and_leave_clip_untouched(tiny_clip):
    clip, tokenizer = load_clip(tiny_clip)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.manual_seed(0)
    net = FinePrompts(clip, tokenizer, prompts=3, top_patches=4)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    image, patches = encode_images(clip, pixels, [1, 2])
    masks = torch.zeros(4, 32, 32)
    masks[2:, 8:16, 8:24] = 1.0
    labels = torch.tensor([0, 0, 1, 1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.5, 0.999))
    history = []
    for _ in range(15):
        loss = training_loss(net, image, patches, masks, labels)
        optimizer.zero_grad()
        loss.backward(inputs=list(net.parameters()))
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history
    assert all(p.grad is None for p in clip.parameters())
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())


def test_fit_trains_on_the_auxiliary_set_and_saves_only_learned_parts(trained, tiny_clip, aux_and_target):
    detector, paths, path = trained
    # train/good + test/good + one image of each of 5 defect types, all of the auxiliary category.
    assert len(paths) == 6 + 4 + 5 and all(aux_and_target[0] in p.parents for p in paths)
    assert detector.steps_done == TINY["steps"]
    # 10 normal images cannot hold out the three scores a threshold needs: all of them train.
    assert detector.threshold is None and detector.normal_scores is None
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        config = json.loads(handle.metadata()["defectlens"])
    learned = {f"prompts.{name}" for name, _ in detector._network().named_parameters()}
    assert keys == learned  # nothing of CLIP itself (and no held-out scores: too few normal images)
    assert config["params"]["clip_model"] == tiny_clip
    assert path.stat().st_size < 100_000


def test_zero_shot_on_an_unseen_category_and_round_trip(trained, aux_and_target):
    detector, _, path = trained
    fabric = aux_and_target[1]
    images = sorted((fabric / "test").rglob("*.png"))
    prediction = detector.predict(images)
    assert prediction.scores.shape == (len(images),) and np.all((prediction.scores >= 0) & (prediction.scores <= 1))
    assert prediction.maps.shape == (len(images), 64, 64) and prediction.maps.min() >= 0 and prediction.maps.max() <= 1
    loaded = Detector.load(path)
    assert isinstance(loaded, FAPrompt) and loaded.threshold == detector.threshold
    again = loaded.predict(images)
    np.testing.assert_allclose(again.scores, prediction.scores, atol=1e-6)
    np.testing.assert_allclose(again.maps, prediction.maps, atol=1e-6)
    big = np.full((40, 72, 3), 128, np.uint8)
    mixed = loaded.predict([images[0], big])
    assert [m.shape for m in mixed.maps] == [(64, 64), (40, 72)]


def test_prompts_of_another_clip_are_refused(trained, tmp_path):
    other = write_tiny_clip(tmp_path / "wider-clip", text_width=48)
    detector = create_detector("faprompt", prompt_file=str(trained[2]), clip_model=str(other), size=32).fit([])
    with pytest.raises(ModelFileError, match="do not fit CLIP"):
        detector.predict([np.zeros((32, 32, 3), np.uint8)])


def test_prompt_file_makes_a_zero_shot_benchmark(trained, tiny_clip, aux_and_target):
    from defectlens.engine.benchmark import run_benchmark

    _, _, path = trained
    with pytest.raises(ValueError, match="prompt_file"):
        create_detector("faprompt", clip_model=tiny_clip).fit([])
    result = run_benchmark(aux_and_target[1], method="faprompt", shots=[0, 2], seeds=1, params={"size": 32, "prompt_file": str(path)})
    zero, two = result.runs
    assert 0 <= zero["metrics"]["all"]["image_auroc"] <= 1 and zero["metrics"]["all"]["pixel_auroc"] > 0
    assert zero["threshold"] == Detector.load(path).threshold  # fit([]) keeps the auxiliary set's threshold
    # With normal images of the target category they set the threshold; the prompts stay as trained.
    fitted = create_detector("faprompt", prompt_file=str(path), size=32).fit(sorted((aux_and_target[1] / "train" / "good").glob("*.png"))[:3])
    assert len(fitted.normal_scores) == 3 and fitted.threshold is not None and two["threshold"] is None
    assert fitted.structure_["top_patches"] == TINY["top_patches"] and fitted.clip_path_ == tiny_clip


def test_interrupted_training_keeps_what_it_learned_and_resumes(tiny_clip, aux_and_target, tmp_path, monkeypatch):
    import defectlens.models.faprompt.model as faprompt_model
    from defectlens.engine.fit import fit_from_folder

    real, calls = faprompt_model.training_loss, []

    def interrupted_on_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(faprompt_model, "training_loss", interrupted_on_third_step)
    detector, _ = fit_from_folder(aux_and_target[0], method="faprompt", params={**TINY, "clip_model": tiny_clip})
    assert detector.steps_done == 2
    path = detector.save(tmp_path / "partial.dlmodel")
    monkeypatch.setattr(faprompt_model, "training_loss", real)
    resumed, _ = fit_from_folder(aux_and_target[0], method="faprompt", params={**TINY, "steps": 3, "prompt_file": str(path)})
    assert resumed.steps_done == 5 and resumed.clip_path_ == tiny_clip
