"""Score fusion: known answers of the ensemble's normalisation and its parameter checks."""

import numpy as np
import pytest

from defectlens.models import ParameterError, create_detector
from defectlens.models.calibration import threshold_from_normal_scores
from defectlens.models.ensemble.model import SOFT_MAX_TEMPERATURE


def test_ensemble_of_one_member_is_that_member_in_z_scores(normal_images, defect_image):
    member = create_detector("patchknn", size=64, bank_size=256).fit(normal_images[:5])
    ensemble = create_detector("ensemble", size=64, members=["patchknn"],
                               member_params={"patchknn": {"bank_size": 256}}).fit(normal_images[:5])
    tests = [normal_images[5], defect_image]
    expected = (member.predict(tests).scores - member.normal_scores.mean()) / member.normal_scores.std(ddof=1)
    np.testing.assert_allclose(ensemble.predict(tests).scores, expected, rtol=1e-6, atol=1e-9)


def test_fused_threshold_comes_from_held_out_normal_scores_and_flags_the_defect(normal_images, defect_image):
    ensemble = create_detector("ensemble", size=64, members=["patchcore", "padim"],
                               member_params={"patchcore": {"bank_size": 128}, "padim": {"feature_dims": 16}})
    ensemble.fit(normal_images[:5])
    assert len(ensemble.normal_scores) == 5
    assert ensemble.threshold == threshold_from_normal_scores(ensemble.normal_scores)
    prediction = ensemble.predict([normal_images[5], defect_image])
    assert prediction.scores[1] > ensemble.threshold > prediction.scores[0]


@pytest.mark.parametrize("member_params, message", [
    ({"padim": {"feature_dims": 8}}, "not among the members"),
    ({"patchknn": {"size": 128}}, "set those on the ensemble"),
    ({"patchknn": {"bank_sise": 1}}, "has no parameter bank_sise"),
])
def test_member_params_are_checked_when_the_ensemble_is_made(member_params, message):
    with pytest.raises(ParameterError, match=message):
        create_detector("ensemble", members=["patchknn", "patchcore"], member_params=member_params)


def test_too_few_normal_images_to_normalise_members_is_a_clear_error(normal_images):
    from defectlens.errors import UsageError

    with pytest.raises(UsageError, match="at least 2 normal images"):
        create_detector("ensemble", size=64, members=["patchknn"]).fit(normal_images[:1])


def member_z_scores_and_maps(ensemble, features):
    """Each member's image z-scores and its patch maps scaled to its normal map range, by hand."""
    z, maps = [], []
    for member, (centre, spread, low, high) in zip(ensemble.fitted_members, ensemble.norms.tolist()):
        member_scores, member_maps = member.score_feature_batch(features)
        z.append((member_scores - centre) / spread)
        maps.append(((member_maps.double() - low) / (high - low)).numpy())
    return z, maps


def member_held_out_z_scores(ensemble):
    """Each member's held-out normal scores as z-scores against its final statistics, by hand."""
    return [(np.asarray(member.normal_scores) - centre) / spread
            for member, (centre, spread, _, _) in zip(ensemble.fitted_members, ensemble.norms.tolist())]


def test_threshold_is_set_on_the_members_held_out_scores_in_the_final_normalisation(normal_images):
    """The fused held-out scores are the members' own held-out scores (same folds) as z-scores
    against the final members' statistics: the scale new images are scored on."""
    from defectlens.models.calibration import threshold_from_normal_scores

    ensemble = create_detector("ensemble", size=64, members=["patchcore", "padim"],
                               member_params={"patchcore": {"bank_size": 128}, "padim": {"feature_dims": 16}})
    ensemble.fit(normal_images)
    members = ensemble.fitted_members
    assert len(members[0].normal_scores) == len(members[1].normal_scores) == len(normal_images)
    expected = np.mean(member_held_out_z_scores(ensemble), axis=0)
    np.testing.assert_allclose(ensemble.normal_scores, expected, rtol=1e-9)
    assert ensemble.threshold == pytest.approx(threshold_from_normal_scores(expected, ensemble.operating_fpr))
    assert abs(float(np.mean(ensemble.normal_scores))) < 1e-9  # z-scores of the very scores that set the norms


def test_max_fusion_takes_each_images_largest_member_z_score_and_map(normal_images, defect_image):
    """fusion="max": the fused score is the larger of the members' z-scores, image by image (a
    member blind to a defect cannot dilute the other's evidence), held-out scores alike; the map
    is the larger of the members' scaled maps, pixel by pixel."""
    params = dict(size=64, members=["patchknn", "padim"],
                  member_params={"patchknn": {"bank_size": 256}, "padim": {"feature_dims": 16}})
    mean = create_detector("ensemble", **params).fit(normal_images[:5])
    largest = create_detector("ensemble", fusion="max", **params).fit(normal_images[:5])
    tests = [normal_images[5], defect_image]
    features = largest.embed_images(tests)
    z, maps = member_z_scores_and_maps(largest, features)
    scores, fused_maps = largest.score_feature_batch(features)
    np.testing.assert_allclose(scores, np.max(z, axis=0), rtol=1e-9)
    np.testing.assert_allclose(fused_maps.numpy(), np.max(maps, axis=0), rtol=1e-5)
    np.testing.assert_allclose(largest.normal_scores, np.max(member_held_out_z_scores(largest), axis=0), rtol=1e-9)
    # Same members, same norms: only the combination differs.
    np.testing.assert_allclose(mean.score_feature_batch(features)[0], np.mean(z, axis=0), rtol=1e-6)
    assert largest.predict([defect_image]).scores[0] > largest.threshold


def test_soft_max_fusion_is_the_larger_z_score_softened_by_the_temperature(normal_images, defect_image):
    """fusion="soft_max": T·log(e^(a/T) + e^(b/T)) of the members' z-scores, held-out scores alike,
    so never below the larger one and at most T·log 2 above it; the maps are the larger scaled map."""
    params = dict(size=64, members=["patchknn", "padim"], fusion="soft_max",
                  member_params={"patchknn": {"bank_size": 256}, "padim": {"feature_dims": 16}})
    soft = create_detector("ensemble", **params).fit(normal_images[:5])
    tests = [normal_images[5], defect_image]
    features = soft.embed_images(tests)
    z, maps = member_z_scores_and_maps(soft, features)
    scores, fused_maps = soft.score_feature_batch(features)
    temperature = SOFT_MAX_TEMPERATURE
    np.testing.assert_allclose(scores, temperature * np.log(np.exp(z[0] / temperature) + np.exp(z[1] / temperature)),
                               rtol=1e-9)
    assert (scores >= np.max(z, axis=0)).all() and (scores <= np.max(z, axis=0) + temperature * np.log(2) + 1e-12).all()
    np.testing.assert_allclose(fused_maps.numpy(), np.max(maps, axis=0), rtol=1e-5)
    held_out = member_held_out_z_scores(soft)
    np.testing.assert_allclose(soft.normal_scores, temperature * np.logaddexp(held_out[0] / temperature,
                                                                              held_out[1] / temperature), rtol=1e-9)
    assert soft.predict([defect_image]).scores[0] > soft.threshold
