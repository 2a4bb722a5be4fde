"""`defectlens demo`: the whole job on the embedded default, offline, in a couple of minutes.

Generates a synthetic MVTec-layout dataset, then for each category runs the k-shot benchmark
of the default detector (with an HTML report), fits a full model, saves it, and predicts the
test images into a CSV with heatmap overlays, through the same Python API the CLI uses.
"""

from __future__ import annotations

import time
from pathlib import Path

from .data.io import scan_inputs
from .engine.benchmark import format_table, markdown_table, parse_shots, run_benchmark
from .engine.fit import fit_from_folder
from .engine.outputs import PredictionOutputs
from .engine.predict import predict_to_outputs
from .errors import UsageError
from .report import table_columns, write_benchmark_json, write_benchmark_report

MARKER = ".defectlens-demo"
DEMO_SHOTS = "1,4,full"
DEMO_SEEDS = 2


def _prepare(out: Path, overwrite: bool) -> None:
    """Only ever write into an empty folder or one a previous demo made (it has the marker)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise UsageError(f"{out} exists and was not made by `defectlens demo`; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by defectlens demo; safe to delete\n")


def run_demo(out: Path, overwrite: bool = False) -> int:
    """Run the demo into ``out``; returns how many test images could not be scored (0 normally)."""
    from .data.generator import generate

    started = time.perf_counter()
    _prepare(out, overwrite)
    print(f"[demo] generating a synthetic MVTec-layout dataset in {out / 'data'}")
    categories = generate(out / "data", kind="mvtec", seed=0, overwrite=True)
    failed = 0
    for category in map(Path, categories):
        name = category.name
        print(f"\n[demo] {name}: k-shot benchmark ({DEMO_SHOTS} shots × {DEMO_SEEDS} seeds)")
        result = run_benchmark(category, shots=parse_shots(DEMO_SHOTS), seeds=DEMO_SEEDS)
        table = format_table(result.summary, result.n_train)
        print(markdown_table(table, table_columns(table)))
        write_benchmark_json(out / f"{name}_benchmark.json", result)
        write_benchmark_report(out / f"{name}_report.html", result, table)

        model = out / "models" / f"{name}.dlmodel"
        print(f"[demo] {name}: fit on train/good -> {model}")
        detector, _ = fit_from_folder(category)
        detector.save(model)

        print(f"[demo] {name}: predict test images -> CSV and overlays")
        outputs = PredictionOutputs(csv=out / f"{name}_predictions.csv", overlays=out / "overlays" / name, overwrite=True)
        summary = predict_to_outputs(detector, scan_inputs([category / "test"]).paths, outputs)
        failed += summary.failed
        print(f"[demo] {name}: {len(summary.rows)} test images, {summary.anomalous} flagged anomalous -> {outputs.csv}")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s. Open the reports: "
          + ", ".join(str(out / f"{Path(c).name}_report.html") for c in categories))
    return failed
