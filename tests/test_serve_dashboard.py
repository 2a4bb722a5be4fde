"""The dashboard in a real browser: Playwright drives Debian's chromium against a running service.

The browser is Debian's package, not Playwright's own download: the fixture installs it with
apt-get when it is missing and the tests run as root (as in CI), and skips with the reason otherwise.
Set DEFECTLENS_SCREENSHOTS=docs/images to refresh the screenshots in the docs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
import httpx  # noqa: E402

from test_serve import AUTH, TOKEN, ServerThread, defect_image, free_port, good_image, png_bytes, tiny_model  # noqa: E402


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed on first use where this runs as root with apt-get."""
    found = find_chromium()
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("Debian's chromium is not installed and cannot be installed here (needs apt-get as root): "
                    "run `apt-get install -y chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(step)}` failed, so the browser test cannot run: {done.stderr.strip()[-500:]}")
    found = find_chromium()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium executable is on PATH")
    return found


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, one_thread):
    from defectlens.serve import create_app
    from defectlens.serve.config import ServeConfig

    model = tiny_model(tmp_path_factory)
    config = ServeConfig(models={"tiny": model}, data_dir=tmp_path_factory.mktemp("dashboard-data"), tokens=(TOKEN,))
    with ServerThread(create_app(config), free_port()) as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
            # A history to look at: good parts, a few defects, some reviewed by an operator.
            goods = [("image", (f"good-{s}.png", png_bytes(good_image(100 + s)), "image/png")) for s in range(16)]
            bads = [("image", (f"scratch-{s}.png", png_bytes(defect_image(200 + s)), "image/png")) for s in range(6)]
            items = client.post("/v1/models/tiny/inspect", files=goods).json()["items"]
            items += client.post("/v1/models/tiny/inspect", files=bads).json()["items"]
            for item in items[:4] + items[-3:]:
                client.post(f"/v1/inspections/{item['id']}/verdict", json={"verdict": item["label"], "operator": "ana"})
            yield server, client


def test_dashboard_upload_heatmap_override_threshold(dashboard, chromium, tmp_path):
    server, client = dashboard
    upload = tmp_path / "part-under-test.png"
    upload.write_bytes(png_bytes(defect_image(7)))
    shots = Path(os.environ.get("DEFECTLENS_SCREENSHOTS") or tmp_path)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1150})
        page.goto(server.url + "/")

        # A token-protected service asks for the token first.
        page.locator("#login-token").fill(TOKEN)
        page.locator("#login-form button").click()
        page.locator("#feed tbody tr").first.wait_for()

        # Upload: the inspection appears with its heatmap.
        page.locator("#upload-file").set_input_files(str(upload))
        page.locator("#upload-button").click()
        page.wait_for_function("document.getElementById('upload-status').textContent.includes('1 inspected')")
        overlay = page.locator("#detail-overlay")
        overlay.wait_for(state="visible")
        page.wait_for_function("document.getElementById('detail-overlay').complete && "
                               "document.getElementById('detail-overlay').naturalWidth === 64")
        assert overlay.get_attribute("src").endswith("/overlay.png")
        assert page.locator("#detail-label").inner_text() == "anomalous"
        # The heatmap is painted over the image: the two pictures on screen differ pixel by pixel.
        differs = page.evaluate("""() => {
            const pixels = (id) => { const img = document.getElementById(id), c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');
                g.drawImage(img, 0, 0); return g.getImageData(0, 0, c.width, c.height).data; };
            const a = pixels('detail-image'), b = pixels('detail-overlay'); let n = 0;
            for (let i = 0; i < a.length; i += 4) if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 2] - b[i + 2]) > 30) n++;
            return n / (a.length / 4); }""")
        assert differs > 0.5
        inspection_id = int(page.locator("#detail-id").inner_text().lstrip("#"))
        page.screenshot(path=str(shots / "serve_dashboard.png"), full_page=True)

        # Override the verdict: the operator says this one is good.
        page.locator("#operator").fill("ben")
        page.locator("#override-button").click()
        page.wait_for_function("document.getElementById('detail-verdict').textContent.startsWith('normal')")
        stored = client.get(f"/v1/inspections/{inspection_id}").json()
        assert stored["verdict"] == "normal" and stored["verdict_by"] == "ben"
        row = page.locator(f"#feed tr[data-id='{inspection_id}']")
        assert "normal" in row.locator("td").last.inner_text()

        # Move the threshold: to the lowest end every held-out normal image would be a false alarm,
        # to the highest none would.
        slider = page.locator("#threshold-slider")
        slider.focus()
        page.keyboard.press("Home")
        page.wait_for_function("document.getElementById('false-alarm-rate').textContent === '100.0 %'")
        page.keyboard.press("End")
        page.wait_for_function("document.getElementById('false-alarm-rate').textContent === '0.0 %'")
        assert page.locator("#recent-flagged").inner_text().startswith("0 of")
        # Back near the model's threshold, the shown rates are the API's figures for that value.
        value = (float(slider.get_attribute("min")) + float(slider.get_attribute("max"))) / 2
        slider.fill(str(value))
        page.wait_for_timeout(400)
        shown = float(page.locator("#threshold-value").inner_text())
        expected = client.get("/v1/models/tiny/threshold-view", params={"threshold": shown}).json()["at"]
        assert page.locator("#false-alarm-rate").inner_text() == f"{100 * expected['false_alarm_rate']:.1f} %"
        page.locator("#threshold-panel").screenshot(path=str(shots / "serve_threshold.png"))

        # Filters: only confirmed defects.
        page.locator("#filter-verdict").select_option("anomalous")
        page.wait_for_function("[...document.querySelectorAll('#feed tbody tr')].length === 3")
        browser.close()
