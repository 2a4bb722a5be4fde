import numpy as np
import pytest
import torch

from defectlens.models import REGISTRY, Detector, ModelFileError, ParameterError, create_detector
from defectlens.models.memory import greedy_coreset

PATCH_METHODS = ["patchcore", "padim", "spade", "patchknn"]


@pytest.mark.parametrize("method", PATCH_METHODS)
def test_defect_scores_above_every_normal_and_map_peaks_on_it(method, normal_images, defect_image):
    detector = create_detector(method, size=128).fit(normal_images[:5])
    prediction = detector.predict([normal_images[5], defect_image])
    assert prediction.scores.shape == (2,)
    assert prediction.scores[1] > prediction.scores[0]
    assert prediction.maps.shape == (2, 128, 128)
    peak = np.unravel_index(np.argmax(prediction.maps[1]), prediction.maps[1].shape)
    assert 72 <= peak[0] <= 108 and 22 <= peak[1] <= 58, f"map peak {peak} is not on the defect"


def test_threshold_needs_two_normal_images_and_separates_normals(normal_images, defect_image):
    single = create_detector("patchcore", size=128).fit(normal_images[:1])
    assert single.threshold is None
    detector = create_detector("patchcore", size=128).fit(normal_images[:5])
    assert detector.threshold is not None and len(detector.normal_scores) == 5
    assert detector.predict([defect_image]).scores[0] > detector.threshold


def test_coreset_covers_every_cluster():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [10.0] * 8, [-10.0] * 8, [10.0] * 4 + [-10.0] * 4])
    points = torch.cat([c + 0.1 * torch.randn(250, 8, generator=generator) for c in centres])
    assert sorted({int(i) // 250 for i in greedy_coreset(points, 4)}) == [0, 1, 2, 3]
    # Two-stage version (per image first): clusters spread over 10 "images" of 100 points.
    shuffled = points[torch.randperm(1000, generator=generator)]
    picked = greedy_coreset(shuffled, 4, groups=10, pool_factor=2)
    assert len({tuple(torch.round(shuffled[i] / 10).tolist()) for i in picked}) == 4


def test_model_file_rejects_newer_versions_and_foreign_files(tmp_path, normal_images):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = create_detector("padim", size=128).fit(normal_images[:2]).save(tmp_path / "m.dlmodel")
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["defectlens"])
    config["format_version"] = 99
    save_file(load_file(str(path)), str(tmp_path / "new.dlmodel"), metadata={"defectlens": json.dumps(config)})
    with pytest.raises(ModelFileError, match="newer"):
        Detector.load(tmp_path / "new.dlmodel")
    torch.save({"bank": torch.zeros(2)}, tmp_path / "pickle.dlmodel")
    with pytest.raises(ModelFileError, match="not a defectlens model"):
        Detector.load(tmp_path / "pickle.dlmodel")
    with pytest.raises(ModelFileError, match="does not exist"):
        Detector.load(tmp_path / "missing.dlmodel")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_file_holding_nan_or_infinity_is_refused_by_name(tmp_path, normal_images, bad):
    """A damaged bank used to load and score every image 0 (NaN distances sort last)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = create_detector("patchknn", size=64, bank_size=256).fit(normal_images[:3]).save(tmp_path / "m.dlmodel")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["bank"][3, 5] = bad
    save_file(tensors, str(tmp_path / "bad.dlmodel"), metadata=metadata)
    with pytest.raises(ModelFileError, match=r"bad\.dlmodel: damaged model file: bank holds NaN or infinite"):
        Detector.load(tmp_path / "bad.dlmodel")


def test_every_registered_method_is_named_as_its_folder():
    assert set(PATCH_METHODS) <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.__module__.split(".")[-2] == name


def test_operating_point_moves_the_threshold_by_the_calibration_rule_and_is_saved(normal_images, tmp_path):
    from defectlens.models.calibration import threshold_from_normal_scores

    detector = create_detector("patchknn", size=64, bank_size=256).fit(normal_images[:6])
    strict = detector.threshold
    assert detector.operating_fpr == 0.01
    loose = detector.set_operating_point(0.3)
    assert loose == detector.threshold == threshold_from_normal_scores(detector.normal_scores, 0.3)
    assert loose < strict
    loaded = Detector.load(detector.save(tmp_path / "model.safetensors"))
    assert (loaded.threshold, loaded.operating_fpr) == (loose, 0.3)


def test_operating_point_without_held_out_scores_is_a_clear_error(normal_images):
    from defectlens.errors import UsageError

    detector = create_detector("patchknn", size=64, bank_size=256).fit(normal_images[:1])
    with pytest.raises(UsageError, match="0 held-out normal scores"):
        detector.set_operating_point(0.05)


def test_cli_fit_target_fpr_says_what_the_threshold_means(tmp_path, normal_images, capsys):
    from PIL import Image

    from defectlens.cli import main

    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(normal_images[:5]):
        Image.fromarray(image).save(folder / f"good_{i}.png")
    path = tmp_path / "model.safetensors"
    assert main(["fit", str(folder), "-o", str(path), "--size", "64", "--target-fpr", "0.05"]) == 0
    assert "flags about 5 % of good parts; set from 5 held-out normal scores" in capsys.readouterr().out
    assert Detector.load(path).operating_fpr == 0.05
    assert main(["predict", str(path), str(folder), "--target-fpr", "0.2", "--threshold", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("method,params", [("patchcore", {"top_k": 3, "bank_size": 100}),
                                           ("patchcore", {"geometry": "tiles", "tile_size": 48}),
                                           ("patchknn", {"search": "ivf"}), ("patchknn", {"metric": "l2"}),
                                           ("patchknn", {"geometry": "tiles", "tile_size": 48, "search": "ivf"}),
                                           ("ensemble", {"members": ["padim", "patchknn"], "fusion": "max",
                                                         "member_params": {"patchknn": {"search": "ivf"}}}),
                                           ("padim", {}), ("composition", {"parts": 3})])
def test_scores_without_maps_are_the_scores_with_maps(method, params, normal_images, defect_image):
    """predict(maps=False) skips the maps (and PatchCore and patch kNN most of their search): same scores."""
    detector = create_detector(method, size=64, **params).fit(normal_images[:4])
    images = [*normal_images[4:], defect_image]
    with_maps = detector.predict(images)
    scores_only = detector.predict(images, maps=False)
    assert scores_only.maps is None and with_maps.maps is not None
    # The most distant patches are searched again: equal up to float32 rounding.
    np.testing.assert_allclose(scores_only.scores, with_maps.scores, rtol=1e-5)
    assert detector.predict([], maps=False).scores.shape == (0,)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_patchknn_patch_score_is_the_distance_to_the_nearest_normal_patch_in_its_metric(metric, normal_images,
                                                                                      defect_image, tmp_path):
    from defectlens.models.patchcore.model import flatten_patches

    detector = create_detector("patchknn", size=64, metric=metric, bank_size=None).fit(normal_images[:3])
    features = detector.embed_images([defect_image])
    queries, bank = flatten_patches(features).double(), flatten_patches(detector.embed_images(normal_images[:3])).double()
    if metric == "cosine":
        unit = torch.nn.functional.normalize
        expected = 1.0 - (unit(queries, dim=1) @ unit(bank, dim=1).T).amax(dim=1)
    else:
        expected = torch.cdist(queries, bank).amin(dim=1)
    np.testing.assert_allclose(detector.score_features(features).flatten().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    loaded = Detector.load(detector.save(tmp_path / "m.dlmodel"))
    assert loaded.metric == metric
    np.testing.assert_array_equal(loaded.score_features(features).numpy(), detector.score_features(features).numpy())
    with pytest.raises(ParameterError, match="metric"):
        create_detector("patchknn", metric="manhattan")


def test_patchcore_batch_scores_are_its_contract_scores(normal_images, defect_image):
    """score_feature_batch reuses the search of every patch for the re-weighting: the same image
    scores as score_features then image_scores, which search the worst patch again."""
    detector = create_detector("patchcore", size=64, top_k=2, bank_size=120).fit(normal_images[:4])
    features = detector.embed_images([*normal_images[4:], defect_image])
    scores, patch_scores = detector.score_feature_batch(features)
    assert torch.equal(patch_scores, detector.score_features(features))
    np.testing.assert_allclose(scores, detector.image_scores(patch_scores, features).numpy(), rtol=1e-6)


def test_padim_model_file_keeps_the_precisions_upper_triangles_and_loads_them_exactly(normal_images, tmp_path):
    detector = create_detector("padim", size=128).fit(normal_images[:4])
    assert torch.equal(detector.precision, detector.precision.transpose(1, 2))
    stored = detector.state_tensors()
    dims = detector.precision.shape[1]
    assert "precision" not in stored and stored["precision_upper"].shape[1] == dims * (dims + 1) // 2
    path = detector.save(tmp_path / "padim.dlmodel")
    loaded = Detector.load(path)
    assert torch.equal(loaded.precision, detector.precision)
    np.testing.assert_array_equal(loaded.predict(normal_images[4:6]).scores, detector.predict(normal_images[4:6]).scores)
    # A version 1 file (whole precisions) still loads.
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["defectlens"])
    tensors = load_file(str(path))
    tensors["precision"] = detector.precision
    del tensors["precision_upper"]
    save_file(tensors, str(tmp_path / "v1.dlmodel"), metadata={"defectlens": json.dumps({**config, "format_version": 1})})
    assert torch.equal(Detector.load(tmp_path / "v1.dlmodel").precision, detector.precision)


def test_padim_blocks_of_positions_give_the_one_pass_gaussians(monkeypatch):
    """Fitting and scoring a block of positions at a time (so tiled sets fit in memory) is the
    same per-position Gaussian as all positions at once: a known answer on random features."""
    from defectlens.models.padim import model as padim_model

    features = torch.randn(6, 20, 5, 7, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(3, 20, 5, 7, generator=torch.Generator().manual_seed(1))
    whole = create_detector("padim", feature_dims=8)
    whole.fit_features(features)
    monkeypatch.setattr(padim_model, "POSITIONS_PER_BLOCK", 4)  # 35 positions: 9 blocks, the last partial
    blocked = create_detector("padim", feature_dims=8)
    blocked.fit_features(features)
    torch.testing.assert_close(blocked.mean, whole.mean)
    torch.testing.assert_close(blocked.precision, whole.precision)
    torch.testing.assert_close(blocked.score_features(queries), whole.score_features(queries))
    # and the Mahalanobis distance at one position by hand
    samples = features[:, whole.channels, 2, 3].double()
    centred = samples - samples.mean(0)
    covariance = centred.T @ centred / 5 + 0.01 * torch.eye(8, dtype=torch.float64)
    offset = queries[0, whole.channels, 2, 3].double() - samples.mean(0)
    expected = torch.sqrt(offset @ torch.linalg.inv(covariance) @ offset)
    assert float(blocked.score_features(queries)[0, 2, 3]) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("augmented", [False, True])
def test_padim_calibration_from_shared_sums_is_the_generic_refit_per_fold(augmented):
    """PaDiM's folds subtract their images' sums from the whole set's instead of re-fitting:
    the held-out scores, threshold and map range are those of the generic loop (re-fit without
    each fold, score it), a held-out image's augmented copies stay out of its fold, and the
    final Gaussians are fit_features' on every sample."""
    from defectlens.models.patch import PatchDetector

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(14, 20, 5, 7, generator=generator) * 0.5 + 1.0
    views = (torch.randn(28, 20, 5, 7, generator=generator), np.repeat(np.arange(14), 2)) if augmented else None
    shared = create_detector("padim", feature_dims=8)
    shared.calibrate_and_fit(features, views)
    generic = create_detector("padim", feature_dims=8)
    PatchDetector.calibrate_and_fit(generic, features, views)
    np.testing.assert_allclose(shared.normal_scores, generic.normal_scores, rtol=1e-5)
    assert shared.threshold == pytest.approx(generic.threshold, rel=1e-5)
    np.testing.assert_allclose(shared.map_range, generic.map_range, rtol=1e-5)
    torch.testing.assert_close(shared.precision, generic.precision)
    torch.testing.assert_close(shared.mean, generic.mean)


def test_padim_says_which_parameter_to_raise_when_a_covariance_cannot_be_inverted():
    # three images in eight dimensions: a rank-2 covariance, whose zero eigenvalues rounding
    # makes slightly negative, more than a vanishing ε makes up
    features = torch.randn(3, 20, 2, 2, generator=torch.Generator().manual_seed(0)) * 1000 + 1e4
    with pytest.raises(ParameterError, match="raise regularisation"):
        create_detector("padim", feature_dims=8, regularisation=1e-300).fit_features(features)


@pytest.mark.parametrize("bank_size, greedy_runs", [(100, 12), (400, 12), (432, 0)])
def test_patchknn_folds_share_each_images_greedy_picks_and_the_final_bank_is_unchanged(monkeypatch, bank_size,
                                                                                        greedy_runs):
    """Six fits (five held-out folds and the final one) run each image's greedy once; the final
    bank is the one fit_features builds on the same features, row for row. Where the folds keep
    their images whole (400 rows: 9 or 10 images × 36 patches fit), the final fit makes its own
    greedy picks, as fit_features does; where all 432 patches fit, no fit picks."""
    from defectlens.models import memory

    features = torch.randn(12, 24, 6, 6, generator=torch.Generator().manual_seed(4))
    reference = create_detector("patchknn", bank_size=bank_size)
    reference.fit_features(features)
    calls = []
    k_center = memory._k_center
    monkeypatch.setattr(memory, "_k_center", lambda *args, **kwargs: calls.append(1) or k_center(*args, **kwargs))
    detector = create_detector("patchknn", bank_size=bank_size).fit_from_features(features)
    assert len(calls) == greedy_runs and len(detector.normal_scores) == 12
    assert torch.equal(detector.bank, reference.bank)


@pytest.mark.parametrize("augmented", [False, True])
def test_patchcore_folds_continue_the_final_greedy_and_leave_out_their_own_patches(monkeypatch, augmented):
    """One greedy for six fits: each held-out fold's bank is the first bank_size picks of the
    final coreset's greedy, continued, that none of its images (nor their copies) gave; the final
    bank is fit_features', row for row."""
    from defectlens.models import memory
    from defectlens.models.calibration import refit_folds
    from defectlens.models.patchcore import model as patchcore_model

    generator = torch.Generator().manual_seed(4)
    features = torch.randn(12, 24, 6, 6, generator=generator)
    views = (torch.randn(12, 24, 6, 6, generator=generator), np.arange(12)) if augmented else None
    samples = features if views is None else torch.cat([features, views[0]])
    reference = create_detector("patchcore", bank_size=100)
    reference.fit_features(samples)
    greedy, banks = [], []
    coreset = memory.greedy_coreset
    monkeypatch.setattr(patchcore_model, "greedy_coreset", lambda *a, **k: greedy.append(1) or coreset(*a, **k))
    detector = create_detector("patchcore", bank_size=100)
    set_bank = detector._set_bank
    monkeypatch.setattr(detector, "_set_bank", lambda bank, *a: banks.append(bank) or set_bank(bank, *a))
    detector.fit_from_features(features, views=views)
    assert len(greedy) == 1 and len(banks) == 6 and len(detector.normal_scores) == 12
    assert torch.equal(detector.bank, reference.bank)
    patches = samples.permute(0, 2, 3, 1).reshape(samples.shape[0], -1, 24)
    for fold, bank in zip(refit_folds(12, 0), banks):
        assert bank.shape[0] == 100
        owned = torch.cat([patches[fold]] + ([patches[12 + fold]] if augmented else [])).reshape(-1, 24)
        assert torch.cdist(bank, owned).min() > 0  # no patch of a held-out image or its copy


@pytest.mark.parametrize("method", ["patchcore", "patchknn"])
def test_ivf_partition_is_trained_once_per_fit_and_loaded_from_the_model_file(method, normal_images, tmp_path,
                                                                              monkeypatch):
    """The held-out folds' fits and the final one share one k-means; loading runs none."""
    import faiss

    from defectlens.models.memory import NearestNeighbours

    trainings, assigned = [], []
    train, add = faiss.IndexIVFFlat.train, faiss.IndexIVFFlat.add
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda index, x: trainings.append(len(x)) or train(index, x))
    monkeypatch.setattr(faiss.IndexIVFFlat, "add", lambda index, x: assigned.append(len(x)) or add(index, x))
    # 600 of the 1,280 patches: every fit keeps a share of each image's patches
    detector = create_detector(method, size=128, bank_size=600, search="ivf").fit(normal_images[:5])
    assert len(detector.normal_scores) == 5 and len(trainings) == 1  # six fits (five held out, one final)
    # patchknn's fits share their images' greedy picks, so one fit's rows are assigned to lists
    # and later ones look most of theirs up; patchcore's folds continue a greedy: each adds its own.
    assert len(assigned) == (1 if method == "patchknn" else 6)
    loaded = Detector.load(detector.save(tmp_path / "model.dlmodel"))
    assert len(trainings) == 1 and len(assigned) == (1 if method == "patchknn" else 6)  # loading assigns none
    np.testing.assert_array_equal(loaded._index.centroids, detector._index.centroids)
    afresh = NearestNeighbours(detector.bank.numpy(), metric=detector.metric, index="ivf", centroids=detector._index.centroids)
    np.testing.assert_array_equal(detector._index.row_lists, afresh.row_lists)
    np.testing.assert_array_equal(loaded._index.row_lists, afresh.row_lists)
    features = detector.embed_images(normal_images[5:7])
    np.testing.assert_array_equal(loaded.score_features(features), detector.score_features(features))


def test_patchknn_on_ivf_scores_an_image_by_its_top_patches_exact_distances(normal_images, defect_image, tmp_path):
    """With and without a map, the image score is the mean of the top patches' exact distances
    (a flat search's), while the map keeps the index's; a model file written before scores by
    the index's distances, as it did."""
    from defectlens.models.memory import NearestNeighbours
    from defectlens.models.patchcore.model import patch_groups

    detector = create_detector("patchknn", size=128, search="ivf").fit(normal_images[:4])
    detector._index.index.nprobe = 1  # a coarse search, so that it errs
    features = detector.embed_images([normal_images[4], defect_image, normal_images[5]])
    exact = NearestNeighbours(detector.bank.numpy(), metric="cosine").search(patch_groups(features).reshape(-1, features.shape[1]).numpy())[0]
    exact = torch.from_numpy(exact[:, 0].reshape(3, -1))
    count = detector._top_count(exact.shape[1])
    expected = exact.topk(count, dim=1).values.mean(dim=1).numpy()
    scores, maps = detector.score_feature_batch(features)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_allclose(detector.feature_scores(features), expected, rtol=1e-5)
    approximate = maps.flatten(1).topk(count, dim=1).values.mean(dim=1).numpy()
    assert np.all(approximate >= expected - 1e-6) and not np.allclose(approximate, expected, rtol=1e-5)
    path = detector.save(tmp_path / "model.dlmodel")
    assert Detector.load(path).exact_top
    earlier = Detector.load(path)
    earlier.load_state_tensors(earlier.state_tensors(), {})  # the state of a file without "exact_top"
    earlier._index.index.nprobe = 1
    assert not earlier.exact_top
    np.testing.assert_allclose(earlier.score_feature_batch(features)[0], approximate, rtol=1e-5)
    np.testing.assert_allclose(earlier.feature_scores(features), approximate, rtol=1e-5)


def test_patchknn_on_ivf_maps_a_sample_of_held_out_images_and_scores_every_one(normal_images, defect_image):
    """Calibration on an approximate index: every held-out image gets the image score a full
    search gives; MAPPED_PER_FOLD of them, spread over the fold, get their whole maps, and each
    of the others its largest exact patch distance (the heatmap range's red end)."""
    from defectlens.models.memory import NearestNeighbours
    from defectlens.models.patchcore.model import patch_groups
    from defectlens.models.patchknn.model import MAPPED_PER_FOLD

    detector = create_detector("patchknn", size=128, search="ivf").fit(normal_images[:4])
    detector._index.index.nprobe = 1  # a coarse search, so that the maps err
    images = [normal_images[4], defect_image, normal_images[5]]
    images += [np.ascontiguousarray(np.rot90(image, turn)) for turn in (1, 2, 3) for image in images]
    features = detector.embed_images(images)
    assert len(images) == MAPPED_PER_FOLD + 4
    scores, maps, peaks = detector.held_out_scores(features)
    full_scores, full_maps = detector.score_feature_batch(features)
    np.testing.assert_allclose(scores, full_scores, rtol=1e-6)
    mapped = np.linspace(0, len(images) - 1, MAPPED_PER_FOLD).round().astype(int)
    np.testing.assert_array_equal(maps, full_maps.numpy()[mapped])
    others = np.setdiff1d(np.arange(len(images)), mapped)
    exact = NearestNeighbours(detector.bank.numpy(), metric="cosine").search(
        patch_groups(features[others]).reshape(-1, features.shape[1]).numpy())[0]
    np.testing.assert_allclose(peaks, exact[:, 0].reshape(len(others), -1).max(axis=1), rtol=1e-5)


@pytest.mark.parametrize("method", ["patchcore", "patchknn"])
@pytest.mark.parametrize("search", ["ivf", "hnsw"])
def test_approximate_search_never_scores_below_the_exact_one_and_keeps_the_defect_on_top(
        method, search, normal_images, defect_image, tmp_path):
    """An approximate index finds real bank rows, so a patch distance is never below the exact
    one; on a clear defect the ranking holds, and the index kind survives the model file."""
    exact = create_detector(method, size=128, bank_size=2000).fit(normal_images[:5])
    approximate = create_detector(method, size=128, bank_size=2000, search=search).fit(normal_images[:5])
    assert approximate._index.kind == search
    features = exact.embed_images([normal_images[5], defect_image])
    assert torch.all(approximate.score_features(features) >= exact.score_features(features) - 1e-4)
    prediction = approximate.predict([normal_images[5], defect_image])
    assert prediction.scores[1] > prediction.scores[0]
    loaded = Detector.load(approximate.save(tmp_path / "model.dlmodel"))
    assert loaded._index.kind == search
    np.testing.assert_allclose(loaded.predict([defect_image]).scores, approximate.predict([defect_image]).scores, rtol=1e-5)
