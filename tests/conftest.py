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
