import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy machine the threads mostly wait
    for each other (a tiny WinCLIP predict took 10 s on 2 threads, 0.1 s on 1)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEFECTLENS_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


SHARED = Path(__file__).resolve().parents[2] / "shared"
BSDATA = SHARED / "datasets" / "bsdata" / "ball_screw"


def textured_image(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A normal 'part': smooth random texture with the same statistics in every image."""
    base = rng.normal(0.5, 0.08, (size // 8, size // 8, 1)).repeat(8, 0).repeat(8, 1)
    noise = rng.normal(0, 0.03, (size, size, 1))
    image = np.clip(base + noise, 0, 1) * np.array([200, 180, 160])
    return image.astype(np.uint8)


@pytest.fixture(scope="session")
def normal_images():
    rng = np.random.default_rng(0)
    return [textured_image(rng) for _ in range(6)]


@pytest.fixture(scope="session")
def defect_image():
    """A normal image with a bright square: an unmistakable structural defect at a known place."""
    image = textured_image(np.random.default_rng(99)).copy()
    image[80:100, 30:50] = (250, 40, 40)
    return image


@pytest.fixture(scope="session")
def synthetic_mvtec(tmp_path_factory):
    from defectlens.data.generator import generate

    out = tmp_path_factory.mktemp("synthetic")
    folders = generate(out, kind="mvtec", seed=3, size=128, n_train=8, n_test_good=4, n_test_defect_per_type=2, categories=["washer"])
    return folders[0]


# -- tiny random-weight CLIPs: the real loading code runs, no weights are downloaded ------------
@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A CLIP folder like a downloaded checkpoint: config, safetensors weights, tokenizer (one
    token per letter, 77 positions: room for WinCLIP's prompt ensemble)."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".-'":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = transformers.CLIPTextConfig(**layers, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)
    vision = transformers.CLIPVisionConfig(**layers, image_size=32, patch_size=8)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=16))
    folder = tmp_path_factory.mktemp("tiny-clip")
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)



PROMPT_WORDS = ("object", "damaged", "a", "photo", "of")


def write_tiny_clip(folder, text_width: int = 32):
    """A CLIP tokenizer whose vocabulary is letters plus a few whole words, and a 2-layer CLIP."""
    import transformers

    vocab = {}
    for char in [*string.ascii_lowercase, "."]:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in PROMPT_WORDS:
        pieces, merged = [*word[:-1], word[-1] + "</w>"], word[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": text_width, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 24,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder



@pytest.fixture(scope="session")
def tiny_prompt_clip(tmp_path_factory):
    """A tiny CLIP whose tokenizer knows a few whole words (short FAPrompt prompts)."""
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """`predict --runtime auto` exports backbones on first use into DEFECTLENS_CACHE: keep the
    tests' exports in a temporary folder instead of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEFECTLENS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
