"""The unified bank: products added one at a time never change the others, images are routed to
their product, an unknown product is flagged, and the model file lists its products."""

import numpy as np
import pytest

from conftest import textured_image
from defectlens.models import Detector, create_detector
from defectlens.errors import UsageError
from defectlens.models.modelfile import describe_model_file

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 64


def striped(rng, side=SIDE, colour=(40, 120, 220)):
    """A second 'product': blue stripes, unlike the textured grey parts."""
    image = np.zeros((side, side, 3), np.uint8)
    image[:] = colour
    image[:, ::8] = 255
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def chequer(rng, side=SIDE):
    """A third look, never learned: a black-and-white chequerboard."""
    board = ((np.arange(side)[:, None] // 8 + np.arange(side)[None, :] // 8) % 2 * 255).astype(np.uint8)
    return np.clip(np.stack([board] * 3, axis=2) + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def products():
    rng = np.random.default_rng(3)
    return {"parts": [textured_image(rng, SIDE) for _ in range(8)], "stripes": [striped(rng) for _ in range(8)]}


def test_adding_a_product_leaves_the_others_scores_unchanged_and_routes_right(products, tmp_path):
    model = create_detector("unified", size=SIDE, bank_size=64)
    model.partial_fit(products["parts"][:6], product="parts")
    before = model.predict(products["parts"][6:])
    model.partial_fit(products["stripes"][:6], product="stripes")
    after = model.predict(products["parts"][6:] + products["stripes"][6:])
    assert after.products == ["parts", "parts", "stripes", "stripes"]
    # the old product's maps are untouched by learning the new one (scores may only move through
    # the unified threshold's calibration, which does not enter the scores themselves)
    np.testing.assert_allclose(after.maps[:2], before.maps, rtol=1e-6)
    np.testing.assert_allclose(after.scores[:2], before.scores, rtol=1e-6)
    path = model.save(tmp_path / "unified.safetensors")
    loaded = Detector.load(path)
    assert loaded.products == ["parts", "stripes"] == describe_model_file(path)["products"]
    np.testing.assert_allclose(loaded.predict(products["stripes"][6:]).scores, after.scores[2:], rtol=1e-6)


def test_an_unknown_product_is_flagged_and_scored_anomalous(products):
    model = create_detector("unified", size=SIDE, bank_size=64)
    model.partial_fit(products["parts"], product="parts").partial_fit(products["stripes"], product="stripes")
    rng = np.random.default_rng(11)
    prediction = model.predict([chequer(rng), chequer(rng)])
    assert prediction.products == [None, None]
    assert (prediction.scores > model.threshold).all()


def test_a_product_name_is_learned_once(products):
    model = create_detector("unified", size=SIDE, bank_size=64).partial_fit(products["parts"][:3], product="parts")
    with pytest.raises(UsageError, match="already knows product 'parts'"):
        model.partial_fit(products["parts"][3:], product="parts")


def test_unknown_cannot_name_a_product(products):
    # predict's CSV says "unknown" for an image of no known product
    with pytest.raises(UsageError, match="'unknown' cannot name a product"):
        create_detector("unified", size=SIDE, bank_size=64).partial_fit(products["parts"][:3], product="unknown")
