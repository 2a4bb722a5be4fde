"""`defectlens demo`: the whole job on the embedded default, offline, in a couple of minutes.

Generates a synthetic MVTec-layout dataset, then for each category runs the k-shot benchmark
of the default detector (with an HTML report), fits a full model, saves it, and predicts the
test images into a CSV with heatmap overlays, exactly as a user would from the command line.
"""

from __future__ import annotations

import time
from pathlib import Path

from .cli import main as cli_main

MARKER = ".defectlens-demo"
DEMO_SHOTS = "1,4,full"
DEMO_SEEDS = 2


def _prepare(out: Path, overwrite: bool) -> None:
    """Only ever write into an empty folder or one a previous demo made (it has the marker)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise FileExistsError(f"{out} exists and was not made by `defectlens demo`; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by defectlens demo; safe to delete\n")


def run_demo(out: Path, overwrite: bool = False) -> int:
    from .data.generator import generate

    started = time.perf_counter()
    _prepare(out, overwrite)
    print(f"[demo] generating a synthetic MVTec-layout dataset in {out / 'data'}")
    categories = generate(out / "data", kind="mvtec", seed=0, overwrite=True)
    status = 0
    for category in categories:
        name = Path(category).name
        print(f"\n[demo] {name}: k-shot benchmark ({DEMO_SHOTS} shots × {DEMO_SEEDS} seeds)")
        status |= cli_main(["benchmark", str(category), "--shots", DEMO_SHOTS, "--seeds", str(DEMO_SEEDS),
                            "--json", str(out / f"{name}_benchmark.json"), "--report", str(out / f"{name}_report.html"),
                            "--overwrite"])
        model = out / "models" / f"{name}.dlmodel"
        print(f"[demo] {name}: fit on train/good -> {model}")
        status |= cli_main(["fit", str(category), "-o", str(model), "--overwrite"])
        print(f"[demo] {name}: predict test images -> CSV and overlays")
        status |= cli_main(["predict", str(model), str(Path(category) / "test"), "--csv", str(out / f"{name}_predictions.csv"),
                            "--overlays", str(out / "overlays" / name), "--overwrite"])
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s. Open the reports: "
          + ", ".join(str(out / f"{Path(c).name}_report.html") for c in categories))
    return status
