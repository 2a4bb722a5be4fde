"""Synthetic anomalies: masks and boxes match the changed pixels, determinism, the CLI, and the
diffusion path on tiny random-weight Stable Diffusion parts."""

import itertools
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import BSDATA, textured_image

from defectlens.cli import main
from defectlens.data.io import read_image, read_mask
from defectlens.synthesis import (
    AnoGenSynthesizer,
    CutPasteSynthesizer,
    PerlinSynthesizer,
    create_synthesizer,
    extract_defects,
    foreground_mask,
    foreground_overlap,
    mask_box,
    perlin_noise,
)
from defectlens.synthesis.base import box_mask, dilate


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=2)


def inside(mask: np.ndarray, box) -> bool:
    return not (mask & ~box_mask(box, mask.shape)).any()


@pytest.fixture(scope="module")
def part():
    """A bright disc (the object) with a small dark dent on a dark noisy belt, and the disc's mask."""
    rng = np.random.default_rng(5)
    image = rng.normal(40, 6, (96, 96, 3)).clip(0, 255).astype(np.uint8)
    disc = np.zeros((96, 96), np.uint8)
    cv2.circle(disc, (48, 48), 30, 1, -1)
    image[disc > 0] = rng.normal(190, 8, (int(disc.sum()), 3)).clip(0, 255).astype(np.uint8)
    defect = image.copy()
    dent = np.zeros((96, 96), np.uint8)
    cv2.ellipse(defect, (40, 52), (5, 3), 30, 0, 360, (70, 60, 55), -1)
    cv2.ellipse(dent, (40, 52), (5, 3), 30, 0, 360, 1, -1)
    return image, disc > 0, defect, dent > 0


# -- Perlin -------------------------------------------------------------------------------------
def test_perlin_noise_is_zero_on_the_lattice_and_bounded():
    noise = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    assert noise.shape == (64, 96) and noise.dtype == np.float32
    assert np.abs(noise[::16, ::16]).max() < 1e-6  # gradient noise vanishes at lattice points
    assert np.abs(noise).max() <= 1.0 and noise.std() > 0.1
    assert np.array_equal(noise, perlin_noise((64, 96), (4, 6), np.random.default_rng(0)))


def test_perlin_mask_covers_every_changed_pixel_and_is_repeatable():
    image = textured_image(np.random.default_rng(1), 96)
    synthesizer = PerlinSynthesizer(min_area=0.01)
    for seed in range(4):
        anomaly = synthesizer(image, np.random.default_rng(seed))
        assert anomaly.image.shape == image.shape and anomaly.image.dtype == np.uint8 and anomaly.kind == "perlin"
        assert anomaly.mask.mean() >= 0.01
        assert not (changed(anomaly.image, image) & ~anomaly.mask).any()
        assert changed(anomaly.image, image).mean() > 0.5 * anomaly.mask.mean()
        assert anomaly.box == mask_box(anomaly.mask)
    again = synthesizer(image, np.random.default_rng(3))
    assert np.array_equal(again.image, anomaly.image) and np.array_equal(again.mask, anomaly.mask)
    assert not np.array_equal(synthesizer(image, np.random.default_rng(4)).mask, anomaly.mask)


def test_perlin_fills_the_mask_with_the_given_texture(part):
    image, _disc, _, _ = part
    flat = np.full((40, 40, 3), (20, 200, 90), np.uint8)  # any distortion of a flat texture stays flat
    anomaly = PerlinSynthesizer(textures=[flat], procedural=0.0, max_beta=0.0, on_foreground=True)(image, np.random.default_rng(2))
    filled = anomaly.image[anomaly.mask]
    assert len(np.unique(filled, axis=0)) == 1
    assert not (anomaly.mask & ~foreground_mask(image)).any()


# -- CutPaste -----------------------------------------------------------------------------------
def test_cutpaste_patch_is_a_piece_of_the_same_image():
    image = textured_image(np.random.default_rng(2), 96)
    for seed in range(3):
        anomaly = CutPasteSynthesizer(variant="patch", jitter=0.0)(image, np.random.default_rng(seed))
        x0, y0, x1, y1 = anomaly.box
        assert anomaly.mask.sum() == (x1 - x0) * (y1 - y0)  # a filled rectangle
        assert not (changed(anomaly.image, image) & ~anomaly.mask).any()
        pasted = anomaly.image[y0:y1, x0:x1]
        _, _, (sx, sy), _ = cv2.minMaxLoc(cv2.matchTemplate(image, pasted, cv2.TM_SQDIFF))
        assert np.array_equal(image[sy:sy + y1 - y0, sx:sx + x1 - x0], pasted)  # cut from the original


def test_cutpaste_scar_is_a_thin_rotated_strip():
    image = textured_image(np.random.default_rng(3), 128)
    anomaly = CutPasteSynthesizer(variant="scar")(image, np.random.default_rng(0))
    assert 0 < anomaly.mask.sum() < 0.02 * anomaly.mask.size
    assert not (changed(anomaly.image, image) & ~anomaly.mask).any()
    with pytest.raises(ValueError, match="variant"):
        CutPasteSynthesizer(variant="round")


# -- foreground and AnoGen-style transplants ----------------------------------------------------
def test_foreground_mask_finds_the_object_and_falls_back_to_everything(part):
    image, disc, _, _ = part
    fg = foreground_mask(image)
    assert (fg & disc).sum() / (fg | disc).sum() > 0.85
    assert foreground_mask(np.full((50, 70, 3), 128, np.uint8)).all()  # nothing to separate


def test_extract_defects_one_example_per_region():
    image = textured_image(np.random.default_rng(4), 96)
    mask = np.zeros((96, 96), bool)
    mask[10:14, 10:16] = mask[60:70, 50:53] = True
    mask[90, 90] = True  # below min_pixels
    examples = extract_defects([image], [mask.astype(np.uint8) * 255])
    assert sorted(int(e.mask.sum()) for e in examples) == [24, 30]
    with pytest.raises(ValueError, match="no defect region"):
        AnoGenSynthesizer([image], [np.zeros((96, 96), bool)])


def test_poisson_blend_keeps_gradients_and_meets_the_target():
    from defectlens.synthesis.anogen import poisson_blend

    target = textured_image(np.random.default_rng(6), 32)
    region = np.zeros((32, 32), bool)
    region[4:28, 6:20] = True
    # A source that differs only by a constant has the target's gradients: the blend is the target.
    brighter = (target.astype(int) + 25).clip(0, 255).astype(np.uint8)
    assert np.abs(poisson_blend(brighter, target, region).astype(int) - target).max() <= 1
    # A dark spot keeps its contrast; nothing outside the region changes.
    spotted = target.copy()
    spotted[14:18, 11:15] = 0
    blended = poisson_blend(spotted, target, region)
    assert np.array_equal(blended[~region], target[~region])
    assert blended[14:18, 11:15].mean() < target[14:18, 11:15].mean() - 60


@pytest.mark.parametrize("blend", ["poisson", "alpha"])
def test_anogen_defect_lies_in_its_box_on_the_object(part, blend):
    image, _disc, defect, dent = part
    synthesizer = AnoGenSynthesizer([defect], [dent], blend=blend, feather=3)
    fg = foreground_mask(image)
    for seed in range(5):
        anomaly = synthesizer(image, np.random.default_rng(seed), foreground=fg)
        assert anomaly.kind == "anogen" and anomaly.box is not None and anomaly.mask.any()
        diff = changed(anomaly.image, image)
        assert diff.any() and not (diff & ~dilate(anomaly.mask, 3)).any()
        assert inside(anomaly.mask, anomaly.box) and inside(diff, anomaly.box)
        assert foreground_overlap(anomaly.box, fg) >= 0.5
        # the transplanted dent is darker than the disc around it
        assert anomaly.image[anomaly.mask].mean() < image[anomaly.mask].mean() - 30
    again = synthesizer(image, np.random.default_rng(4), foreground=fg)
    assert np.array_equal(again.image, anomaly.image) and again.box == anomaly.box


@pytest.mark.skipif(not BSDATA.is_dir(), reason="BSData not present")
def test_anogen_on_real_pitting():
    name = min((BSDATA / "test" / "pitting").iterdir())
    image = read_image(name)
    mask = read_mask(BSDATA / "ground_truth" / "pitting" / f"{name.stem}_mask.png")
    normal = read_image(min((BSDATA / "train" / "good").iterdir()))
    anomaly = AnoGenSynthesizer([image], [mask])(normal, np.random.default_rng(0))
    assert foreground_overlap(anomaly.box, foreground_mask(normal)) >= 0.5
    assert inside(anomaly.mask, anomaly.box)
    assert not (changed(anomaly.image, normal) & ~dilate(anomaly.mask, 3)).any()


# -- CLI ----------------------------------------------------------------------------------------
def test_synthesize_cli_writes_matching_images_masks_and_boxes(synthetic_mvtec, tmp_path, capsys):
    out = tmp_path / "anogen"
    assert main(["synthesize", str(synthetic_mvtec), str(out), "--kind", "anogen", "-n", "3", "--anomalies", "2", "--seed", "1"]) == 0
    manifest = json.loads((out / "synthesis.json").read_text())
    assert len(manifest["held_out"]) == 2
    assert all("/test/" in path and "/test/good/" not in path for path in manifest["held_out"])
    for item in manifest["items"]:
        image, mask = read_image(out / item["image"]), read_mask(out / item["mask"])
        normal = read_image(item["normal"])
        assert "/train/good/" in item["normal"] and mask.any() and inside(mask, item["box"])
        assert not (changed(image, normal) & ~dilate(mask, 3)).any()
    first = (out / "images" / "0002.png").read_bytes()
    assert main(["synthesize", str(synthetic_mvtec), str(out), "--kind", "anogen", "-n", "3", "--anomalies", "2", "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synthesize", str(synthetic_mvtec), str(out), "--kind", "anogen", "-n", "3", "--anomalies", "2", "--seed", "1",
                 "--overwrite"]) == 0
    assert (out / "images" / "0002.png").read_bytes() == first


def test_synthesize_cli_rejects_unknown_params_and_missing_anomalies(synthetic_mvtec, tmp_path, capsys):
    assert main(["synthesize", str(synthetic_mvtec), str(tmp_path / "a"), "--kind", "cutpaste", "--param", "varaint=scar"]) == 2
    assert "varaint" in capsys.readouterr().err
    normals = tmp_path / "normals"
    normals.mkdir()
    cv2.imwrite(str(normals / "a.png"), textured_image(np.random.default_rng(0), 64))
    assert main(["synthesize", str(normals), str(tmp_path / "b"), "--kind", "anogen"]) == 2
    assert "no anomalous test images" in capsys.readouterr().err
    assert main(["synthesize", str(normals), str(tmp_path / "c"), "--kind", "cutpaste", "-n", "2", "--param", "variant=scar"]) == 0
    assert len(list((tmp_path / "c" / "masks").iterdir())) == 2
    (tmp_path / "a file").write_text("x")
    assert main(["synthesize", str(normals), str(tmp_path / "a file"), "--kind", "cutpaste", "-n", "2"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_synthesize_diffusion_without_weights_says_how_to_get_them(synthetic_mvtec, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEFECTLENS_SD_MODEL", raising=False)
    assert main(["synthesize", str(synthetic_mvtec), str(tmp_path / "d"), "--kind", "diffusion", "-n", "1"]) == 2
    assert "DEFECTLENS_SD_MODEL" in capsys.readouterr().err


# -- diffusion on tiny random-weight parts ------------------------------------------------------
def tiny_parts():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from defectlens.synthesis.diffusion import DiffusionParts

    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False)
    return DiffusionParts(unet, vae, text, tokenizer, scheduler)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def test_mask_weighted_loss_known_answers_and_embedding_training_lowers_it(parts, part, one_thread):
    from defectlens.synthesis import diffusion

    _, _, defect, dent = part
    pixels, masks = diffusion.defect_crops([defect], [dent], size=16)
    latents = diffusion.encode_images(parts, pixels).expand(4, -1, -1, -1)
    weights = diffusion.latent_weights(masks, parts.vae_factor).expand(4, -1, -1, -1)
    assert 0 < weights.sum() < weights.numel()
    generator = torch.Generator().manual_seed(0)
    noise, timesteps = torch.randn(latents.shape, generator=generator), torch.randint(1000, (4,), generator=generator)
    _, start = diffusion.placeholder_token(parts)
    embedding = torch.nn.Parameter(start.clone())
    states = diffusion.encode_prompts(parts, ["a photo of a <defect>"] * 4, embedding)
    predicted = parts.unet(parts.scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=states).sample
    full = diffusion.masked_diffusion_loss(parts, latents, torch.ones_like(weights), states, noise, timesteps)
    assert torch.allclose(full, torch.nn.functional.mse_loss(predicted, noise))
    left = torch.zeros_like(weights)
    left[..., : left.shape[-1] // 2] = 1
    half = diffusion.masked_diffusion_loss(parts, latents, left, states, noise, timesteps)
    assert torch.allclose(half, torch.nn.functional.mse_loss(predicted[..., : left.shape[-1] // 2], noise[..., : left.shape[-1] // 2]))

    optimiser = torch.optim.Adam([embedding], lr=0.1)
    losses = []
    for _ in range(6):
        states = diffusion.encode_prompts(parts, ["a photo of a <defect>"] * 4, embedding)
        loss = diffusion.masked_diffusion_loss(parts, latents, weights, states, noise, timesteps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(b <= a for a, b in itertools.pairwise(losses))

    learned = diffusion.learn_embedding(parts, [defect], [dent], steps=3, size=16, progress=False)
    assert learned.shape == start.shape and not torch.allclose(learned, start)


def test_box_guided_denoising_keeps_the_noised_original_outside_the_box(parts, one_thread):
    from defectlens.synthesis import diffusion

    original = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    box = torch.zeros(1, 1, 8, 8)
    box[..., 2:5, 3:7] = 1
    states = diffusion.encode_prompts(parts, ["a photo of a <defect>"], torch.zeros(32))
    empty = diffusion.encode_prompts(parts, [""], torch.zeros(32))
    seen = []
    final = diffusion.guided_denoise(parts, original, box, states, empty, steps=4, guidance=3.0,
                                     generator=torch.Generator().manual_seed(0),
                                     on_step=lambda i, t, z: seen.append((i, z.clone())))
    outside = box == 0
    assert torch.equal(final[outside.expand_as(final)], original[outside.expand_as(original)])
    assert not torch.allclose(final[box.bool().expand_as(final)], original[box.bool().expand_as(original)])
    # Before the last step, outside = sqrt(a_t) z + sqrt(1 - a_t) e with one and the same noise e.
    timesteps = parts.scheduler.timesteps
    implied = []
    for i, latents in seen[:-1]:
        a = parts.scheduler.alphas_cumprod[timesteps[i + 1]]
        implied.append(((latents - a.sqrt() * original) / (1 - a).sqrt())[outside.expand_as(latents)])
    assert all(torch.allclose(e, implied[0], atol=1e-4) for e in implied)
    assert 0.5 < implied[0].std() < 1.5


def test_diffusion_synthesizer_changes_only_its_box(parts, part, one_thread):
    from defectlens.synthesis import diffusion

    image, _disc, defect, dent = part
    synthesizer = create_synthesizer("diffusion", anomaly_images=[defect], anomaly_masks=[dent], parts=parts,
                                     embedding=torch.zeros(32), size=16, steps=3)
    fg = foreground_mask(image)
    anomaly = synthesizer(image, np.random.default_rng(0), foreground=fg)
    assert anomaly.kind == "diffusion" and np.array_equal(anomaly.mask, box_mask(anomaly.box, image.shape))
    diff = changed(anomaly.image, image)
    assert diff.any() and inside(diff, anomaly.box)
    assert foreground_overlap(anomaly.box, fg) >= 0.5
    again = synthesizer(image, np.random.default_rng(0), foreground=fg)
    assert np.array_equal(again.image, anomaly.image)
    assert isinstance(diffusion.DiffusionSynthesizer, type)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random-weight Stable Diffusion saved in the diffusers folder layout."""
    folder = tmp_path_factory.mktemp("sd")
    parts = tiny_parts()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(folder / name)
    return folder, parts


def test_load_parts_reads_a_diffusers_folder_and_explains_what_is_missing(sd_folder, tmp_path, monkeypatch):
    from defectlens.backbones.hf import ModelNotAvailable
    from defectlens.synthesis.diffusion import (
        load_embedding,
        load_parts,
        save_embedding,
    )

    monkeypatch.delenv("DEFECTLENS_SD_MODEL", raising=False)
    with pytest.raises(ModelNotAvailable, match="DEFECTLENS_SD_MODEL"):
        load_parts()
    with pytest.raises(ModelNotAvailable, match="neither a folder on this machine nor in the Hugging Face cache"):
        load_parts(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotAvailable, match="folder .* could not be loaded"):
        load_parts(str(tmp_path))
    folder, saved = sd_folder
    monkeypatch.setenv("DEFECTLENS_SD_MODEL", str(folder))
    loaded = load_parts(device="cpu")
    assert torch.equal(loaded.unet.conv_in.weight, saved.unet.conv_in.weight)
    assert loaded.tokenizer("abc").input_ids == saved.tokenizer("abc").input_ids
    save_embedding(tmp_path / "defect.safetensors", torch.arange(4.0))
    assert torch.equal(load_embedding(tmp_path / "defect.safetensors"), torch.arange(4.0))


def test_synthesize_cli_diffusion_from_a_local_folder(sd_folder, synthetic_mvtec, tmp_path, one_thread):
    from defectlens.synthesis.diffusion import load_embedding

    out = tmp_path / "diffusion"
    params = [f"sd_model={sd_folder[0]}", "train_steps=2", "size=16", "steps=2", "device=cpu"]
    assert main(["synthesize", str(synthetic_mvtec), str(out), "--kind", "diffusion", "-n", "2", "--anomalies", "1",
                 *[arg for p in params for arg in ("--param", p)]]) == 0
    manifest = json.loads((out / "synthesis.json").read_text())
    assert len(manifest["held_out"]) == 1 and load_embedding(out / manifest["embedding"]).shape == (32,)
    for item in manifest["items"]:
        image, normal = read_image(out / item["image"]), read_image(item["normal"])
        assert np.array_equal(read_mask(out / item["mask"]), box_mask(item["box"], image.shape))
        assert inside(changed(image, normal), item["box"])
