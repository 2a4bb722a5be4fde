"""Prediction on a Dask cluster: the single-process results, and none lost or doubled when a worker dies."""

import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from defectlens.engine.dask import predict_paths_dask  # noqa: E402
from defectlens.engine.predict import predict_paths  # noqa: E402
from defectlens.models import Detector, create_detector  # noqa: E402
from defectlens.report import save_png  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def job(tmp_path_factory, normal_images, defect_image, one_thread):
    folder = tmp_path_factory.mktemp("dask")
    model = create_detector("patchcore", size=64).fit(normal_images).save(folder / "m.dlmodel")
    paths = []
    for index in range(14):
        image = defect_image if index % 5 == 0 else normal_images[index % len(normal_images)]
        paths.append(save_png(folder / f"{index:02d}.png", np.roll(image, index, axis=1)))
    (folder / "broken.png").write_bytes(b"not a png")
    paths.insert(3, folder / "broken.png")
    return model, [Path(p) for p in paths]


@pytest.fixture(scope="module")
def cluster(one_thread):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        with distributed.Client(local) as client:
            yield client


def test_two_workers_give_the_single_process_results_in_order(job, cluster):
    model, paths = job
    expected = list(predict_paths(Detector.load(model), paths, progress=False))
    got = list(predict_paths_dask(model, paths, cluster, chunk=3, progress=False))
    assert [r.path for r in got] == paths
    assert [r.error is None for r in got] == [r.error is None for r in expected] and got[3].error
    for mine, theirs in zip(got, expected):
        if theirs.error is None:
            assert mine.score == pytest.approx(theirs.score, rel=1e-6)
            np.testing.assert_allclose(mine.anomaly_map, theirs.anomaly_map, rtol=1e-5, atol=1e-6)


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(job, cluster):
    model, paths = job
    results = predict_paths_dask(model, paths, cluster, chunk=1, progress=False)
    seen = [next(results).path]
    # SIGKILL the worker holding the most unread chunk results or running chunks (its nanny
    # starts a new one): those must be computed again elsewhere.
    held = {worker: [key for key in keys if "score_chunk" in str(key)] for worker, keys in cluster.has_what().items()}
    for worker, keys in cluster.processing().items():
        held[worker] = held.get(worker, []) + [key for key in keys if "score_chunk" in str(key)]
    victim = max(held, key=lambda worker: len(held[worker]))
    assert held[victim], "nothing left to lose: the kill would not be mid-run"
    os.kill(cluster.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    seen += [r.path for r in results]
    assert Counter(seen) == Counter(paths)
    assert seen == paths


def test_cli_writes_the_same_csv_and_maps_with_a_local_cluster(job, tmp_path):
    from defectlens.cli import main

    model, paths = job
    folder = str(paths[0].parent)
    assert main(["predict", str(model), folder, "--runtime", "torch", "--csv", str(tmp_path / "one.csv"), "--maps", str(tmp_path / "one")]) == 1
    assert main(["predict", str(model), folder, "--runtime", "torch", "--dask", "local:2", "--csv", str(tmp_path / "two.csv"),
                 "--maps", str(tmp_path / "two")]) == 1  # 1: the broken file is an error row in both
    # The same rows; the map column names each run's own folder.
    two = (tmp_path / "two.csv").read_text().replace(str(tmp_path / "two"), str(tmp_path / "one"))
    assert (tmp_path / "one.csv").read_text() == two
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == len(paths) - 1
    for name in names:
        np.testing.assert_allclose(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name), rtol=1e-5, atol=1e-6)


def test_a_wrong_scheduler_is_one_line_and_leaves_no_output(job, tmp_path, capsys):
    from defectlens.cli import main

    model, paths = job
    for scheduler, message in (("local:0", "N >= 1"), ("local:two", "N >= 1"), ("bogus", "cannot reach a Dask scheduler")):
        assert main(["predict", str(model), str(paths[0]), "--dask", scheduler, "--csv", str(tmp_path / "out.csv")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out.csv").exists()
