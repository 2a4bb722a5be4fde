"""Load test of `defectlens serve` on loopback: many concurrent clients, then a kill -9 mid-load.

    python benchmarks/serve_load.py [--clients 100] [--seconds 60] [--size 128] [--workers 1] [--queue 32]

Phase 1 (load): a fresh service with one patchcore model (fitted here on generated textures at
--size px) gets --clients concurrent clients posting one --size px PNG per request for --seconds.
A client that gets 503 waits the Retry-After the service sent, as the API documents. Reported: every
status, p50/p99 latency of accepted requests, throughput, the server's RSS over time; checked: no
answer other than 200 or the documented 503, and the database holds exactly the accepted inspections.
Then SIGTERM: the service must stop cleanly (graceful shutdown).

Phase 2 (kill -9): the same load on a fresh history, the server killed with SIGKILL after
--kill-after s; checked: SQLite integrity_check is ok, every acknowledged inspection is in the
database with its image file, and a restarted service serves each of them.

Loopback only: the service binds 127.0.0.1. Writes benchmarks/results/serve_load.md. Exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def textured(rng: np.random.Generator, size: int) -> np.ndarray:
    """A 'good part': blocky random texture (the test suite's generator, at any size)."""
    base = rng.normal(0.5, 0.08, (size // 8, size // 8, 1)).repeat(8, 0).repeat(8, 1)
    image = np.clip(base + rng.normal(0, 0.03, (size, size, 1)), 0, 1) * np.array([200, 180, 160])
    return image.astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Server:
    def __init__(self, model: Path, data: Path, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        env.pop("DEFECTLENS_TOKEN", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "defectlens.cli", "serve", f"part={model}", "--data", str(data), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(args.workers), "--queue", str(args.queue)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(data.with_suffix(".log"), "ab"))
        self.log = data.with_suffix(".log")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        self.process.kill()
        raise SystemExit("server did not start in 180 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        started = time.monotonic()
        while not self.stop.wait(1.0):
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.monotonic() - started, value))


@dataclass
class Tally:
    statuses: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list)  # seconds, accepted requests
    refused_latencies: list = field(default_factory=list)
    acknowledged: list = field(default_factory=list)  # inspection ids of 200 answers
    failures: list = field(default_factory=list)  # anything else, first few kept

    def status(self, code) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1


async def load(url: str, images: list[bytes], clients: int, seconds: float, tally: Tally,
               kill_at: float | None = None, kill=None) -> float:
    """Run ``clients`` clients for ``seconds``; returns the elapsed wall time."""
    started = time.monotonic()
    end = started + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(index: int, http: httpx.AsyncClient):
        n = index
        while time.monotonic() < end:
            n += clients
            sent = time.monotonic()
            try:
                response = await http.post("/v1/models/part/inspect",
                                           files=[("image", (f"c{index}-{n}.png", images[n % len(images)], "image/png"))])
            except httpx.TransportError as error:
                if kill_at is not None and time.monotonic() - started >= kill_at:
                    return  # the server was killed on purpose
                tally.status("transport error")
                tally.failures.append(repr(error)[:200])
                await asyncio.sleep(0.5)
                continue
            elapsed = time.monotonic() - sent
            tally.status(response.status_code)
            if response.status_code == 200:
                tally.latencies.append(elapsed)
                tally.acknowledged.extend(item["id"] for item in response.json()["items"])
            elif response.status_code == 503 and response.json()["error"]["code"] == "overloaded":
                tally.refused_latencies.append(elapsed)
                wait = float(response.headers.get("retry-after", "1"))
                await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))
            else:
                tally.failures.append(f"{response.status_code}: {response.text[:200]}")

    async def killer():
        await asyncio.sleep(kill_at)
        kill()

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [client(i, http) for i in range(clients)]
        if kill_at is not None:
            tasks.append(killer())
        await asyncio.gather(*tasks)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", type=int, default=128, help="image side and model input size (px)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue", type=int, default=32)
    parser.add_argument("--kill-seconds", type=float, default=20, help="length of the kill -9 phase's load")
    parser.add_argument("--kill-after", type=float, default=10, help="SIGKILL the server this many s into it")
    parser.add_argument("--rss-growth-mb", type=float, default=300,
                        help="fail when RSS grows more than this from the first sample after warm-up")
    parser.add_argument("--out", default=str(HERE / "results" / "serve_load.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from defectlens.models import create_detector

    checks: list[tuple[str, bool]] = []
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="defectlens-serve-load-"))
    rng = np.random.default_rng(0)
    model = work / "part.dlmodel"
    print(f"fitting patchcore at {args.size} px on 10 generated images", flush=True)
    create_detector("patchcore", size=args.size).fit([textured(rng, args.size) for _ in range(10)]).save(model)
    images = []
    for i in range(16):
        image = textured(rng, args.size)
        if i % 4 == 0:  # a quarter of the parts carry a defect
            image[args.size // 3: args.size // 2, args.size // 3: args.size // 2] = (250, 40, 40)
        images.append(png(image))

    # -- phase 1: load ---------------------------------------------------------------------------
    server = Server(model, work / "load", args)
    sampler = RssSampler(server.process.pid)
    sampler.start()
    print(f"phase 1: {args.clients} clients for {args.seconds:.0f} s", flush=True)
    tally = Tally()
    elapsed = asyncio.run(load(server.url, images, args.clients, args.seconds, tally))
    sampler.stop.set()
    sampler.join()
    metrics = httpx.get(server.url + "/metrics").text
    # Graceful stop: SIGTERM while requests are in flight; each of them must still be answered.
    in_flight = Tally()

    async def stop_under_load():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def one(i):
                response = await http.post("/v1/models/part/inspect",
                                           files=[("image", (f"last-{i}.png", images[i % len(images)], "image/png"))])
                in_flight.status(response.status_code)
                if response.status_code == 200:
                    in_flight.acknowledged.extend(item["id"] for item in response.json()["items"])
            requests = [asyncio.create_task(one(i)) for i in range(min(10, args.queue + args.workers))]
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*requests, return_exceptions=True)

    stop_started = time.monotonic()
    asyncio.run(stop_under_load())
    exit_code = server.process.wait(120)
    stop_seconds = time.monotonic() - stop_started
    stopped_cleanly = "Application shutdown complete" in server.log.read_text()
    accepted_in_flight = len(in_flight.acknowledged)
    tally.acknowledged += in_flight.acknowledged
    with sqlite3.connect(work / "load" / "inspections.db") as connection:
        rows = connection.execute("SELECT COUNT(*) FROM inspections").fetchone()[0]
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
    accepted = len(tally.acknowledged)
    throughput = (accepted - accepted_in_flight) / elapsed
    rss = [value for _, value in sampler.samples]
    warm = [value for t, value in sampler.samples if t >= 5] or rss
    growth = max(warm) - warm[0] if warm else float("nan")
    checks += [
        ("no answer other than 200 or the documented 503 (overloaded)", not tally.failures),
        (f"database rows ({rows}) == accepted inspections ({accepted})", rows == accepted),
        ("SQLite integrity_check after the load: ok", integrity == "ok"),
        (f"RSS growth after warm-up ({growth:.0f} MB) ≤ {args.rss_growth_mb:.0f} MB", growth <= args.rss_growth_mb),
        (f"SIGTERM with {sum(in_flight.statuses.values())} requests in flight: all answered 200 ({in_flight.statuses}), "
         f"shutdown complete in {stop_seconds:.1f} s", in_flight.statuses == {200: sum(in_flight.statuses.values())}
         and stopped_cleanly and exit_code in (0, -signal.SIGTERM)),
    ]

    # -- phase 2: kill -9 mid-load ---------------------------------------------------------------
    print(f"phase 2: {args.clients} clients, SIGKILL after {args.kill_after:.0f} s", flush=True)
    killed = Server(model, work / "kill", args)
    kill_tally = Tally()
    asyncio.run(load(killed.url, images, args.clients, args.kill_seconds, kill_tally, kill_at=args.kill_after,
                     kill=lambda: os.kill(killed.process.pid, signal.SIGKILL)))
    killed.process.wait(30)
    database = work / "kill" / "inspections.db"
    with sqlite3.connect(database) as connection:
        kill_integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        stored = dict(connection.execute("SELECT id, image_key FROM inspections").fetchall())
    lost = sorted(set(kill_tally.acknowledged) - set(stored))
    files_missing = [i for i in kill_tally.acknowledged
                     if i in stored and not (work / "kill" / "blobs" / stored[i][:2] / stored[i]).is_file()]
    restarted = Server(model, work / "kill", args)
    with httpx.Client(base_url=restarted.url, timeout=60) as http:
        served = sum(http.get(f"/v1/inspections/{i}").status_code == 200 for i in kill_tally.acknowledged)
        after = http.post("/v1/models/part/inspect", files=[("image", ("after.png", images[0], "image/png"))]).status_code
    restarted.process.send_signal(signal.SIGTERM)
    restarted.process.wait(120)
    acked = len(kill_tally.acknowledged)
    checks += [
        (f"kill -9: {acked} acknowledged, {len(stored)} rows, none lost", acked > 0 and not lost),
        ("kill -9: SQLite integrity_check ok", kill_integrity == "ok"),
        ("kill -9: every acknowledged inspection's image file is on disk", not files_missing),
        (f"kill -9: the restarted service serves all {acked} acknowledged inspections and accepts new ones",
         served == acked and after == 200),
    ]
    load_after = os.getloadavg()

    # -- report ------------------------------------------------------------------------------------
    ok = all(passed for _, passed in checks)
    scored = [float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("defectlens_inference_seconds_sum")]
    counted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("defectlens_inference_seconds_count")]
    inference_ms = 1000 * sum(scored) / max(1, sum(counted))
    lines = [
        f"# Inspection service under load: {args.clients} clients × {args.seconds:.0f} s, then kill -9",
        "",
        f"`python benchmarks/serve_load.py --clients {args.clients} --seconds {args.seconds:.0f} --size {args.size} "
        f"--workers {args.workers} --queue {args.queue}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
        "",
        f"**Shared machine:** the load generator, the server and other people's jobs ran on the same {os.cpu_count()} "
        f"cores (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), so latencies and throughput "
        "are upper bounds for latency and lower bounds for throughput of an idle box. Loopback only (127.0.0.1).",
        "",
        f"Model: patchcore at {args.size} px (fitted here on 10 generated {args.size} px textures); each request is one "
        f"{args.size}×{args.size} PNG; a quarter of them have a defect. Clients that get 503 wait the Retry-After "
        "the service sends.",
        "",
        "## Load",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests answered | {sum(tally.statuses.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(tally.statuses.items(), key=str))}) |",
        f"| accepted inspections | {accepted - accepted_in_flight} in {elapsed:.1f} s = **{throughput:.1f} images/s** |",
        f"| latency of accepted requests (queueing included) | p50 **{1000 * percentile(tally.latencies, 50):.0f} ms**, "
        f"p99 **{1000 * percentile(tally.latencies, 99):.0f} ms**, max {1000 * max(tally.latencies, default=float('nan')):.0f} ms |",
        f"| latency of 503 answers | p50 {1000 * percentile(tally.refused_latencies, 50):.0f} ms, "
        f"p99 {1000 * percentile(tally.refused_latencies, 99):.0f} ms |",
        f"| prediction time per image (server's histogram mean) | {inference_ms:.1f} ms |",
        f"| server RSS | {warm[0] if warm else float('nan'):.0f} MB after warm-up, max {max(rss, default=float('nan')):.0f} MB, "
        f"last {rss[-1] if rss else float('nan'):.0f} MB ({len(rss)} samples, 1/s) |",
        f"| rows in the database afterwards | {rows} (the timed load's {accepted - accepted_in_flight} + "
        f"{accepted_in_flight} answered during the graceful stop) |",
        f"| graceful stop (SIGTERM with requests in flight) | all answered, stopped after {stop_seconds:.1f} s "
        f"(uvicorn re-raises the signal once stopped: exit status {exit_code}) |",
        "",
        "## kill -9 mid-load",
        "",
        f"{args.clients} clients on a fresh history; SIGKILL {args.kill_after:.0f} s in: {acked} inspections acknowledged, "
        f"{len(stored)} rows found (rows beyond the acknowledged ones were committed but their answer never reached "
        f"the client), lost: {len(lost)}, integrity_check: {kill_integrity}, restarted service served "
        f"{served}/{acked} and accepted a new inspection ({after}).",
        "",
        "## Checks",
        "",
        *[f"- {'PASS' if passed else 'FAIL'}: {name}" for name, passed in checks],
        "",
    ]
    if tally.failures or kill_tally.failures:
        lines += ["Failures (first 10):", "", *[f"- `{f}`" for f in (tally.failures + kill_tally.failures)[:10]], ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
