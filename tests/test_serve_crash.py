"""kill -9 of a loaded server: no acknowledged inspection is lost and the database stays readable."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
import httpx  # noqa: E402

from test_serve import free_port, good_image, png_bytes, tiny_model  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def start_server(model: Path, data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "DEFECTLENS_THREADS": "1"}
    env.pop("DEFECTLENS_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "defectlens.cli", "serve", f"tiny={model}", "--data", str(data),
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


def test_kill_9_mid_load_loses_no_acknowledged_inspection(tmp_path_factory, tmp_path):
    model = tiny_model(tmp_path_factory)
    port = free_port()
    server = start_server(model, tmp_path, port)
    acknowledged: list[int] = []
    stop = threading.Event()
    images = [png_bytes(good_image(seed)) for seed in range(8)]

    def client(index: int):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/models/tiny/inspect",
                                         files=[("image", ("p.png", images[index % len(images)], "image/png"))])
                except httpx.TransportError:
                    return  # the server is gone
                if response.status_code == 200:
                    acknowledged.extend(item["id"] for item in response.json()["items"])
                elif response.status_code != 503:
                    raise AssertionError(response.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)  # mid-load: requests are in flight right now
        server.wait(30)
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
        for thread in threads:
            thread.join(30)
    assert len(acknowledged) >= 30

    database = tmp_path / "inspections.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0]: row[1] for row in connection.execute("SELECT id, image_key FROM inspections")}
    assert set(acknowledged) <= set(stored), f"lost {sorted(set(acknowledged) - set(stored))}"
    for inspection_id in acknowledged:
        key = stored[inspection_id]
        assert (tmp_path / "blobs" / key[:2] / key).is_file()

    # The service opens the same history again (no migration needed) and keeps recording.
    from defectlens.serve.store import InspectionStore

    store = InspectionStore(f"sqlite:///{database}")
    try:
        assert all(store.get(i)["image_key"] == stored[i] for i in acknowledged)
        new = store.add([{**store.get(acknowledged[0]), "id": None}])
        assert new[0] > max(stored)
    finally:
        store.close()
