"""IUF's incremental step: it lowers the loss on the new object and leaves the earlier objects'
most important input directions of every linear weight exactly where they were."""

import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models.iuf.networks import IUFNetwork, ProjectedUpdates, compression_loss, omega

pytestmark = pytest.mark.usefixtures("one_thread")


def object_features(seed: int, count: int = 6, channels: int = 12, side: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(channels, 1, 1, generator=generator) * 2
    return centre + 0.3 * torch.randn(count, channels, side, side, generator=generator)


def test_omega_is_zero_for_the_first_channel_and_grows_as_k_log_c():
    np.testing.assert_allclose(omega(0.5, 4).numpy(), 0.5 * np.log([1, 2, 3, 4]), rtol=1e-6)


def test_compression_loss_sums_the_small_singular_values():
    latent = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))[None]  # 4 tokens, 4 channels
    assert compression_loss(latent, kept=2).item() == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_an_incremental_step_lowers_the_loss_and_keeps_the_projected_directions(beta):
    model = create_detector("iuf", size=64, dims=8, heads=2, layers=1, steps=40, batch_size=6, kept=4, beta=beta)
    old, new = object_features(1), object_features(2)
    # learn the first object through the detector's own training loop on precomputed features
    model.network = IUFNetwork(old.shape[1], 8, 2, 1, 1, True, tuple(old.shape[2:]))
    model.updates = ProjectedUpdates(model.network)
    model.train_object(old, 0)
    model.updates.record([old])
    model.network.add_object()
    basis = model.updates.bases()
    before = model.updates.weights()
    position = model.network.position.detach().clone()
    # every layer's bias is projected with its weight: [W | b] against the inputs [x, 1]
    assert all(basis[name].shape[0] == before[name].shape[1] == layer.in_features + 1
               for name, layer in model.updates.layers.items())
    with torch.no_grad():
        loss_before = model.loss(new, 1).item()
    model.train_object(new, 1)
    with torch.no_grad():
        loss_after = model.loss(new, 1).item()
    assert loss_after < loss_before
    after = model.updates.weights()
    for name, vectors in basis.items():
        top = vectors[:, :1]  # c = 1: Ω = 0, never rewritten
        torch.testing.assert_close(after[name] @ top, before[name] @ top, atol=1e-5, rtol=0)
    # the position embedding, shared by every object, stays as the first object left it
    torch.testing.assert_close(model.network.position.detach(), position, atol=0, rtol=0)
    # and the layers did learn something in the other directions
    assert any(not torch.allclose(after[n], before[n]) for n in basis)


def test_covariances_recorded_without_the_bias_still_project_the_weight_alone():
    # model files written before biases were projected hold in × in covariances
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2))
    updates = ProjectedUpdates(layer, {"0": torch.eye(3, dtype=torch.float64)})
    before = updates.weights()
    assert before["0"].shape == (2, 3)
    bias = layer[0].bias.detach().clone()
    with torch.no_grad():
        layer[0].weight += 1.0
        layer[0].bias += 1.0
    updates.project(before, k=0.5)  # Ω = 0.5·log c: c = 1 (the first basis vector) stays as before
    basis = updates.bases()["0"]
    torch.testing.assert_close(layer[0].weight.detach() @ basis[:, :1], before["0"] @ basis[:, :1])
    torch.testing.assert_close(layer[0].bias.detach(), bias + 1.0)  # not part of the old basis: untouched


def test_partial_fit_adds_products_and_the_file_lists_them(tmp_path):
    rng = np.random.default_rng(0)
    grey = [np.clip(rng.normal(128, 10, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    blue = [np.clip(rng.normal((40, 80, 200), 10, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    model = create_detector("iuf", size=64, dims=8, heads=2, layers=1, steps=3, batch_size=2, kept=4)
    model.partial_fit(grey, product="grey").partial_fit(blue, product="blue")
    loaded = Detector.load(model.save(tmp_path / "iuf.safetensors"))
    assert loaded.products == ["grey", "blue"]
    np.testing.assert_allclose(loaded.predict(blue[:2]).scores, model.predict(blue[:2]).scores, rtol=1e-5)
