"""The inspection service through HTTP: a real uvicorn server on loopback, started once for the module."""

from __future__ import annotations

import io
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from conftest import textured_image  # noqa: E402
from defectlens.serve.config import ConfigError, ServeConfig, parse_model_specs  # noqa: E402
from defectlens.serve.inspection import LoadedModel  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- helpers the other serve test modules import ------------------------------------------------------
def tiny_model(tmp_path_factory) -> Path:
    """A patchcore model on 64-px generated textures, fitted once per test session."""
    path = tmp_path_factory.getbasetemp() / "serve-tiny.dlmodel"
    if not path.exists():
        from defectlens.models import create_detector

        rng = np.random.default_rng(0)
        create_detector("patchcore", size=64).fit([textured_image(rng, 64) for _ in range(6)]).save(path)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def good_image(seed: int = 1) -> np.ndarray:
    return textured_image(np.random.default_rng(seed), 64)


def defect_image(seed: int = 2) -> np.ndarray:
    image = good_image(seed).copy()
    image[20:36, 24:40] = (250, 40, 40)
    return image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread of the test process, stopped the way a signal stops it."""

    def __init__(self, app, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(timeout=30)


# -- a model whose predictions wait for the test: fills the pool on purpose ---------------------------
class GatedDetector:
    def __init__(self, inner):
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()
        self.name, self.threshold = inner.name, inner.threshold
        self.normal_scores, self.map_range = inner.normal_scores, inner.map_range

    def predict(self, images):
        self.entered.set()
        self.gate.wait(30)
        return self.inner.predict(images)


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    model_path = tiny_model(tmp_path_factory)
    tiny = LoadedModel.load("tiny", model_path)
    gated = LoadedModel("gated", model_path, GatedDetector(tiny.detector))
    gated.detector.gate.set()
    data = tmp_path_factory.mktemp("serve-data")
    config = ServeConfig(models={"tiny": model_path, "gated": model_path}, data_dir=data, tokens=(TOKEN,),
                         workers=1, queue=1, max_upload_bytes=2_000_000, max_pixels=1_000_000, max_batch=4)
    from defectlens.serve import create_app

    app = create_app(config, {"tiny": tiny, "gated": gated})
    with ServerThread(app, free_port()) as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            yield client, app, gated.detector


def inspect(client, *images, name="tiny", field="image", **params):
    files = [(field, (f"part{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post(f"/v1/models/{name}/inspect", files=files, params=params)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


# -- inspecting ---------------------------------------------------------------------------------------
def test_defect_is_flagged_with_heatmap_and_stored(service):
    client, app, _ = service
    good = inspect(client, png_bytes(good_image())).json()["items"][0]
    bad = inspect(client, png_bytes(defect_image()), raw_map=True).json()["items"][0]
    assert bad["score"] > good["score"]
    assert bad["label"] == "anomalous" and good["label"] == "normal"
    assert bad["threshold"] == pytest.approx(app.state.models["tiny"].detector.threshold)
    # The map is at the image's size and peaks inside the defect.
    anomaly_map = np.asarray(bad["map"])
    assert anomaly_map.shape == (64, 64)
    peak = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
    assert 16 <= peak[0] < 40 and 20 <= peak[1] < 44
    overlay = client.get(bad["overlay_url"])
    assert overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == (64, 64)
    stored_map = np.load(io.BytesIO(client.get(bad["map_url"]).content))
    np.testing.assert_allclose(stored_map, anomaly_map, rtol=2e-3, atol=1e-3)
    # The stored image is the upload, byte for byte, under its content hash.
    assert client.get(bad["image_url"]).content == png_bytes(defect_image())
    assert client.get(f"/v1/inspections/{bad['id']}").json()["score"] == pytest.approx(bad["score"])


def test_batch_keeps_good_images_when_one_is_bad(service):
    client, _, _ = service
    response = inspect(client, png_bytes(good_image(3)), b"not an image at all", png_bytes(defect_image(4)))
    assert response.status_code == 200
    items = response.json()["items"]
    assert [("error" in item) for item in items] == [False, True, False]
    assert "not a recognised image format" in items[1]["error"] and items[1]["source_name"] == "part1.png"
    assert items[2]["label"] == "anomalous"


# -- bad input: every one a 4xx with a JSON error that says what is wrong ---------------------------------
def test_truncated_image(service):
    client, _, _ = service
    data = png_bytes(good_image())
    error = error_of(response := inspect(client, data[: len(data) // 2]))
    assert response.status_code == 422 and error["code"] == "bad_image" and "truncated" in error["message"]


def test_non_image(service):
    client, _, _ = service
    error = error_of(response := inspect(client, b"%PDF-1.4 definitely not a picture"))
    assert response.status_code == 422 and "not a recognised image format" in error["message"]


def test_too_many_pixels_is_refused_before_decoding(service):
    client, _, _ = service
    # 2000 × 2000 of one colour: a 10 kB file that would decode to 12 MB (limit here 1 Mpx).
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000
    error = error_of(response := inspect(client, buffer.getvalue()))
    assert response.status_code == 422 and "above the 1 Mpx decoding limit" in error["message"]


def test_too_large_upload(service):
    client, _, _ = service
    response = inspect(client, b"\x89PNG" + bytes(3_000_000))
    assert response.status_code == 413 and error_of(response)["code"] == "too_large"
    assert 'defectlens_rejected_requests_total{reason="too_large"}' in client.get("/metrics").text


def test_too_large_chunked_upload_without_length(service):
    client, _, _ = service

    def body():  # a well-formed multipart part whose file never ends within the limit
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(40):
            yield bytes(100_000)

    response = client.post("/v1/models/tiny/inspect", content=body(),
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and error_of(response)["code"] == "too_large"


def test_wrong_field(service):
    client, _, _ = service
    error = error_of(response := inspect(client, png_bytes(good_image()), field="file"))
    assert response.status_code == 422 and "'image'" in error["message"] and "'file'" in error["message"]


def test_image_field_holding_text(service):
    client, _, _ = service
    response = client.post("/v1/models/tiny/inspect", data={"image": "part.png"}, files=[("other", ("x", b"x"))])
    assert response.status_code == 422 and "file upload" in error_of(response)["message"]
    # One image part without a filename in a batch: refused whole, not dropped from it.
    body = b"".join([b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                     b"Content-Type: image/png\r\n\r\n" + png_bytes(good_image()) + b"\r\n",
                     b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nnot a file\r\n--B--\r\n"])
    mixed = client.post("/v1/models/tiny/inspect", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert mixed.status_code == 422 and "part 2 of 2" in error_of(mixed)["message"]


def test_not_multipart(service):
    client, _, _ = service
    response = client.post("/v1/models/tiny/inspect", content=png_bytes(good_image()), headers={"Content-Type": "image/png"})
    assert response.status_code == 415 and "multipart/form-data" in error_of(response)["message"]


def test_too_many_images(service):
    client, _, _ = service
    response = inspect(client, *[png_bytes(good_image())] * 5)
    assert response.status_code == 400 and "files" in error_of(response)["message"].lower()


@pytest.mark.parametrize("name", ["nope", "tiny.dlmodel", "Tiny", "a..b", "x" * 65])
def test_unknown_model(service, name):
    client, _, _ = service
    response = inspect(client, png_bytes(good_image()), name=name)
    assert response.status_code == 404
    assert "tiny" in error_of(response)["message"]  # names the models that exist


@pytest.mark.parametrize("name", ["..", "%2e%2e%2fetc", "..%2f..%2fetc%2fpasswd"])
def test_path_traversal_in_a_model_name_reaches_no_route(service, name):
    client, _, _ = service
    response = inspect(client, png_bytes(good_image()), name=name)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}])
def test_token_required(service, headers):
    client, _, _ = service
    for method, path in [("POST", "/v1/models/tiny/inspect"), ("GET", "/v1/inspections"), ("GET", "/metrics"),
                         ("GET", "/healthz"), ("GET", "/v1/inspections/1/image")]:
        response = httpx.request(method, str(client.base_url) + path, headers=headers)
        assert response.status_code == 401, path
        assert "token" in error_of(response)["message"] and response.headers["www-authenticate"] == "Bearer"


def test_login_cookie_authenticates_the_dashboard(service):
    client, _, _ = service
    base = str(client.base_url)
    assert httpx.get(base + "/dashboard/index.html").status_code == 200  # the static shell holds no data
    assert httpx.post(base + "/v1/login", json={"token": "wrong-token-0123456789"}).status_code == 401
    with httpx.Client(base_url=base) as browser:
        login = browser.post("/v1/login", json={"token": TOKEN})
        assert login.status_code == 204 and "httponly" in login.headers["set-cookie"].lower()
        assert browser.get("/v1/models").status_code == 200


# -- overload -----------------------------------------------------------------------------------------
def test_requests_beyond_the_queue_get_503_with_retry_after(service):
    client, app, gated = service
    gated.gate.clear()
    gated.entered.clear()
    image = png_bytes(good_image())
    results = []

    def post():
        with httpx.Client(base_url=client.base_url, headers=AUTH, timeout=30) as own:
            results.append(inspect(own, image, name="gated"))

    running = threading.Thread(target=post)
    running.start()
    assert gated.entered.wait(30)  # one job in the worker
    waiting = threading.Thread(target=post)
    waiting.start()
    deadline = time.monotonic() + 30
    while app.state.pool.pending < 2 and time.monotonic() < deadline:  # one more in the queue (capacity 2)
        time.sleep(0.01)
    refused = inspect(client, image, name="gated")
    gated.gate.set()
    running.join(30)
    waiting.join(30)
    assert refused.status_code == 503 and error_of(refused)["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in results] == [200, 200]
    assert 'defectlens_rejected_requests_total{reason="overloaded"}' in client.get("/metrics").text


def test_graceful_stop_answers_requests_in_flight(service, tmp_path):
    from defectlens.serve import create_app

    _, app, _ = service
    tiny = app.state.models["tiny"]
    held = LoadedModel("held", tiny.path, GatedDetector(tiny.detector))
    config = ServeConfig(models={"held": tiny.path}, data_dir=tmp_path, workers=1, queue=4)
    second = create_app(config, {"held": held})
    results = []
    server = ServerThread(second, free_port()).__enter__()

    def post():
        with httpx.Client(base_url=server.url, timeout=30) as own:
            results.append(inspect(own, png_bytes(good_image()), name="held"))

    clients = [threading.Thread(target=post) for _ in range(3)]
    for client in clients:
        client.start()
    assert held.detector.entered.wait(30)
    deadline = time.monotonic() + 30
    while second.state.pool.pending < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.server.should_exit = True  # what SIGTERM does
    time.sleep(0.3)
    held.detector.gate.set()
    for client in clients:
        client.join(30)
    server.thread.join(30)
    assert not server.thread.is_alive()
    assert [r.status_code for r in results] == [200, 200, 200]
    from defectlens.serve.store import InspectionStore

    store = InspectionStore(config.database_url)
    assert store.count() == 3
    store.close()


def test_pool_bounds_jobs_and_estimates_the_wait():
    import asyncio

    from defectlens.serve.pool import InferencePool, Overloaded

    pool = InferencePool(workers=1, queue=2)
    release = threading.Event()

    async def scenario():
        assert await pool.run(time.sleep, 0.2) is None  # teaches the pool a job takes ~0.2 s
        jobs = [asyncio.ensure_future(pool.run(release.wait, 30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert pool.pending == 3 and pool.full
        with pytest.raises(Overloaded) as refused:
            await pool.run(time.sleep, 0)
        # Three jobs of ~0.2 s ahead (the running mean starts at 0.1 s): about a second, never 0.
        assert refused.value.retry_after == 1
        jobs[0].cancel()  # a client that gives up does not free the worker its job holds
        await asyncio.sleep(0.05)
        assert pool.pending == 3
        release.set()
        await asyncio.gather(*jobs[1:])
        await asyncio.sleep(0.05)
        assert pool.pending == 0

    asyncio.run(scenario())
    pool.shutdown()


# -- history, verdicts, threshold view, export ----------------------------------------------------------
def test_history_filters_and_pages(service):
    client, _, _ = service
    for seed in (10, 11, 12):
        inspect(client, png_bytes(defect_image(seed)))
    everything = client.get("/v1/inspections", params={"model": "tiny", "limit": 500}).json()["items"]
    anomalous = client.get("/v1/inspections", params={"label": "anomalous", "model": "tiny", "limit": 500}).json()["items"]
    assert {i["id"] for i in anomalous} == {i["id"] for i in everything if i["label"] == "anomalous"}
    ids = [i["id"] for i in everything]
    assert ids == sorted(ids, reverse=True)
    first = client.get("/v1/inspections", params={"model": "tiny", "limit": 2}).json()
    second = client.get("/v1/inspections", params={"model": "tiny", "limit": 2, "before_id": first["next_before_id"]}).json()
    assert [i["id"] for i in first["items"] + second["items"]] == ids[:4]
    assert client.get("/v1/inspections", params={"until": "2000-01-01T00:00:00Z"}).json()["items"] == []
    assert client.get("/v1/inspections", params={"after_id": ids[0]}).json()["items"] == []
    bad = client.get("/v1/inspections", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in error_of(bad)["message"]


def test_verdicts_move_the_threshold_view(service):
    client, _, _ = service
    good = inspect(client, png_bytes(good_image(20))).json()["items"][0]
    bad = inspect(client, png_bytes(defect_image(21))).json()["items"][0]
    confirmed = client.post(f"/v1/inspections/{bad['id']}/verdict", json={"verdict": "anomalous", "operator": "ana"}).json()
    assert confirmed["verdict"] == "anomalous" and confirmed["verdict_by"] == "ana"
    overridden = client.post(f"/v1/inspections/{good['id']}/verdict", json={"verdict": "normal"}).json()
    assert overridden["verdict"] == "normal"
    invalid = client.post(f"/v1/inspections/{good['id']}/verdict", json={"verdict": "maybe"})
    assert invalid.status_code == 422 and "verdict" in error_of(invalid)["message"]
    assert client.post("/v1/inspections/999999/verdict", json={"verdict": "normal"}).status_code == 404
    huge = str(2**63)  # beyond the database's integers: 422, not an overflow (500)
    for call in (lambda: client.get(f"/v1/inspections/{huge}"), lambda: client.get(f"/v1/inspections/{huge}/image"),
                 lambda: client.post(f"/v1/inspections/{huge}/verdict", json={"verdict": "normal"}),
                 lambda: client.get("/v1/inspections", params={"before_id": huge}),
                 lambda: client.get("/v1/inspections", params={"after_id": huge})):
        assert call().status_code == 422

    view = client.get("/v1/models/tiny/threshold-view").json()
    normal = np.asarray(service[1].state.models["tiny"].detector.normal_scores)
    assert sum(view["histogram"]["normal"]) == len(normal)
    assert view["at"]["threshold"] == pytest.approx(view["model_threshold"])
    below = client.get("/v1/models/tiny/threshold-view", params={"threshold": bad["score"] - 1e-3}).json()["at"]
    above = client.get("/v1/models/tiny/threshold-view", params={"threshold": bad["score"] + 1e-3}).json()["at"]
    assert below["detection_rate"] == 1.0 and below["confirmed_defects"] >= 1
    assert above["confirmed_defects_missed"] >= 1
    lowest = client.get("/v1/models/tiny/threshold-view", params={"threshold": normal.min() - 1}).json()["at"]
    assert lowest["false_alarm_rate"] == 1.0
    assert lowest["recent_flagged"] == lowest["recent"]
    assert view["drift"]["status"] in {"ok", "drift", "unknown"} and view["drift"]["reason"]
    for odd in ("nan", "inf", "-inf", "1e400", "1.7976931348623157e308"):  # not a threshold: a clear 422, not a 500
        refused = client.get("/v1/models/tiny/threshold-view", params={"threshold": odd})
        assert refused.status_code == 422 and "threshold" in error_of(refused)["message"]


def test_confirmed_good_export(service, tmp_path):
    client, app, _ = service
    item = inspect(client, png_bytes(good_image(30))).json()["items"][0]
    client.post(f"/v1/inspections/{item['id']}/verdict", json={"verdict": "normal"})
    archive = zipfile.ZipFile(io.BytesIO(client.get("/v1/models/tiny/confirmed-good.zip").content))
    names = archive.namelist()
    assert names and all(n.startswith("tiny/train/good/") for n in names)
    assert png_bytes(good_image(30)) in {archive.read(n) for n in names}

    from defectlens.serve.runner import export_good

    counts = export_good(app.state.config, tmp_path)
    assert counts["tiny"] == len(names)
    exported = sorted((tmp_path / "tiny" / "train" / "good").iterdir())
    assert [p.name for p in exported] == sorted(n.rsplit("/", 1)[1] for n in names)


def test_metrics_count_inspections(service):
    client, _, _ = service
    before = client.get("/v1/inspections", params={"model": "tiny", "label": "anomalous", "limit": 500}).json()["items"]
    text = client.get("/metrics").text
    line = next(l for l in text.splitlines() if l.startswith('defectlens_inspections_total{label="anomalous",model="tiny"}'))
    assert float(line.split()[-1]) == len(before)
    assert "defectlens_http_request_seconds_bucket" in text and "defectlens_flagged_ratio" in text


# -- configuration ----------------------------------------------------------------------------------------
def test_refuses_to_listen_beyond_loopback_without_token(tmp_path):
    config = ServeConfig(models={"m": tmp_path / "m.dlmodel"}, host="0.0.0.0")
    with pytest.raises(ConfigError, match="without an API token"):
        config.check_exposure()
    ServeConfig(models={}, host="0.0.0.0", insecure=True).check_exposure()
    ServeConfig(models={}, host="0.0.0.0", tokens=(TOKEN,)).check_exposure()
    ServeConfig(models={}, host="::1").check_exposure()
    with pytest.raises(ConfigError, match="at least 16"):
        ServeConfig(models={}, tokens=("short",)).check_exposure()


def test_model_names_are_validated():
    assert parse_model_specs(["a/b/screw.dlmodel", "pcb=x.dlmodel"]) == {"screw": Path("a/b/screw.dlmodel"), "pcb": Path("x.dlmodel")}
    for bad in (["../x=m.dlmodel"], ["a/b=m.dlmodel"], ["..=m"], ["x=a", "x=b"], []):
        with pytest.raises(ConfigError):
            parse_model_specs(bad)


def test_transductive_methods_are_not_served():
    from defectlens.models import create_detector
    from defectlens.serve.inspection import check_servable

    with pytest.raises(ConfigError, match="against each other"):
        check_servable(create_detector("musc"), "m.dlmodel")
    check_servable(create_detector("patchcore"), "p.dlmodel")


def test_cli_refuses_exposure_without_token(tmp_path, capsys, monkeypatch):
    from defectlens.cli import main

    monkeypatch.delenv("DEFECTLENS_TOKEN", raising=False)
    assert main(["serve", str(tmp_path / "m.dlmodel"), "--host", "0.0.0.0", "--data", str(tmp_path)]) == 2
    assert "without an API token" in capsys.readouterr().err


def test_newer_schema_is_refused(tmp_path):
    from sqlalchemy import text

    from defectlens.serve.migrations import LATEST, SchemaError
    from defectlens.serve.store import InspectionStore

    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = InspectionStore(url)
    with store.engine.begin() as connection:
        connection.execute(text("INSERT INTO defectlens_schema VALUES (:v, 'future', '2030-01-01')"), {"v": LATEST + 1})
    store.close()
    with pytest.raises(SchemaError, match="newer"):
        InspectionStore(url)


@pytest.mark.skipif(not __import__("os").environ.get("DEFECTLENS_TEST_POSTGRES_URL"),
                    reason="set DEFECTLENS_TEST_POSTGRES_URL=postgresql+psycopg://... (an empty database) to run")
def test_store_on_postgresql():
    import os

    from sqlalchemy import text

    from defectlens.serve.migrations import LATEST
    from defectlens.serve.store import InspectionFilter, InspectionStore, utcnow

    url = os.environ["DEFECTLENS_TEST_POSTGRES_URL"]
    store = InspectionStore(url)
    try:
        with store.engine.begin() as connection:
            connection.execute(text("DELETE FROM feedback"))
            connection.execute(text("DELETE FROM inspections"))
        row = {"created_at": utcnow(), "model": "m", "source_name": "a.png", "image_key": "0" * 64 + ".png",
               "width": 4, "height": 3, "score": 2.5, "threshold": 2.0, "label": "anomalous", "inference_ms": 1.0}
        ids = store.add([row, {**row, "score": 1.0, "label": "normal", "image_key": "1" * 64 + ".png"}])
        assert store.set_verdict(ids[1], "normal", "ana", None)["verdict"] == "normal"
        assert [r["id"] for r in store.list(InspectionFilter(model="m"))] == ids[::-1]
        assert store.count(InspectionFilter(label="anomalous")) == 1
        assert store.verdict_scores("m", "normal") == [1.0]
        assert [r["image_key"] for r in store.confirmed_good("m")] == ["1" * 64 + ".png"]
    finally:
        store.close()
    reopened = InspectionStore(url)  # migrations already applied: nothing to do, same data
    with reopened.engine.connect() as connection:
        assert connection.execute(text("SELECT max(version) FROM defectlens_schema")).scalar() == LATEST
    assert reopened.count() == 2
    reopened.close()


def test_cli_refuses_a_taken_port_and_bad_limits(tmp_path_factory, tmp_path, capsys):
    import socket

    from defectlens.cli import main

    model = tiny_model(tmp_path_factory)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(model), "--port", str(port), "--data", str(tmp_path)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    (tmp_path / "a file").write_text("x")
    (tmp_path / "db" / "inspections.db").mkdir(parents=True)
    for data, message in ((tmp_path / "a file", "is a file, not a folder"), (tmp_path / "db", "is a folder, not the history")):
        assert main(["serve", str(model), "--data", str(data)]) == 2
        assert message in capsys.readouterr().err
    for option in (["--port", "99999"], ["--workers", "0"], ["--queue", "-1"], ["--max-upload-mb", "-1"],
                   ["--max-batch", "0"], ["--max-pixels", "nan"]):
        with pytest.raises(SystemExit) as stop:
            main(["serve", str(model), *option])
        assert stop.value.code == 2 and option[0] in capsys.readouterr().err


def test_healthz_is_unavailable_once_the_data_folder_is_deleted(tmp_path_factory, tmp_path):
    """It said ok while every upload failed: the open SQLite connection still answered SELECT 1."""
    import shutil

    from fastapi.testclient import TestClient

    from defectlens.serve import create_app

    data = tmp_path / "data"
    config = ServeConfig(models={"tiny": tiny_model(tmp_path_factory)}, data_dir=data, workers=1)
    with TestClient(create_app(config)) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        shutil.rmtree(data / "blobs")
        images_gone = client.get("/healthz")
        shutil.rmtree(data)
        all_gone = client.get("/healthz")
    assert images_gone.status_code == all_gone.status_code == 503
    assert error_of(images_gone) == {"code": "unavailable",
                                     "message": f"cannot store inspections: the image folder {data / 'blobs'} is gone"}
    assert error_of(all_gone)["message"] == f"cannot store inspections: the database file {data.resolve() / 'inspections.db'} is gone"
