"""Unified incremental protocol (issue 12): the generator's 13 categories plus BSData ball_screw
and DeepPCB pcb (15 objects), schedule 10-1x5 by default, every method of
engine/incremental.py; writes benchmarks/results/incremental.md and .json.

Sized for a shared 2-core machine: 128 px inputs, at most --max-train normal training images and
--max-test test images (half normal, half anomalous) per object, --iuf-steps optimiser steps per
IUF object. The objects' order is the generator's categories (alphabetical) then the real sets.

    PYTHONPATH=src python benchmarks/incremental.py [--schedule 10-1x5] [--size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from defectlens.backbones import get_backbone
from defectlens.data.generator import generate
from defectlens.engine.incremental import EVAL_SIDE, METHODS, IncrementalResult, ObjectData, default_params, load_objects, markdown, run_incremental
from defectlens.report.incremental import write_incremental_report

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "datasets"
REAL = [SHARED / "bsdata" / "ball_screw", SHARED / "deeppcb" / "pcb"]


def to_tensors(item: ObjectData) -> dict:
    return {"name": item.name, "train": item.train, "test": item.test, "labels": torch.from_numpy(item.labels),
            "masks": [None if m is None else torch.from_numpy(m) for m in item.masks]}


def from_tensors(item: dict) -> ObjectData:
    return ObjectData(item["name"], item["train"], item["test"], item["labels"].numpy(),
                      [None if m is None else m.numpy() for m in item["masks"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="10-1x5")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=20)
    parser.add_argument("--max-test", type=int, default=16)
    parser.add_argument("--bank-size", type=int, default=1024)
    parser.add_argument("--iuf-steps", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default="/tmp/defectlens-incremental", help="where the generated categories go")
    parser.add_argument("--out", default=str(HERE / "results" / "incremental"))
    parser.add_argument("--suffix", default="", help="appended to --out (e.g. -iuf for a run of some methods)")
    parser.add_argument("--iuf-param", action="append", default=[], metavar="KEY=VALUE",
                        help="an IUF parameter for this run (JSON value), repeatable; the method is then listed as "
                             "iuf[KEY=VALUE,...]")
    parser.add_argument("--objects", default=None, metavar="A,B,...",
                        help="run on these objects only, in this order (default: all 15)")
    parser.add_argument("--report", action="store_true",
                        help="also write the HTML report (plots of each object's AUROC across steps) as OUT.html")
    parser.add_argument("--note", default="", help="a sentence for the results' header (what this run is)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="merge the results of runs of different methods (same objects and schedule) into --out")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, Path(args.out), args.report)
        return

    generated = Path(args.data) / f"generated-{args.size}"
    if not generated.is_dir():
        generate(generated, kind="mvtec", seed=0, size=args.size, n_train=args.max_train, n_test_good=args.max_test // 2,
                 n_test_defect_per_type=2, categories="all")
    roots = [generated] + [root for root in REAL if root.is_dir()]
    backbone = get_backbone(size=args.size)
    cache = Path(args.data) / f"features-{args.size}-{args.max_train}-{args.max_test}.pt"
    started = time.perf_counter()
    if cache.is_file():  # our own cache of plain tensors, read with weights_only (no code runs)
        objects = [from_tensors(item) for item in torch.load(cache, weights_only=True)]
    else:
        objects = load_objects(roots, backbone, max_train=args.max_train, max_test=args.max_test)
        torch.save([to_tensors(o) for o in objects], cache)
    embed_seconds = time.perf_counter() - started
    if args.objects:
        by_name = {o.name: o for o in objects}
        wanted = args.objects.split(",")
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise SystemExit(f"--objects: unknown {', '.join(unknown)} (known: {', '.join(by_name)})")
        objects = [by_name[name] for name in wanted]
    params = default_params(args.size, bank_size=args.bank_size, iuf_steps=args.iuf_steps)
    overrides = {key: json.loads(value) for key, _, value in (pair.partition("=") for pair in args.iuf_param)}
    params["iuf"].update(overrides)
    load = os.getloadavg()[0]
    result = run_incremental(objects, args.schedule, backbone, params, methods=tuple(args.methods.split(",")))
    if overrides and "iuf" in result.methods:
        result.methods["iuf[" + ",".join(args.iuf_param) + "]"] = result.methods.pop("iuf")
    result.settings.update(size=args.size, max_train=args.max_train, max_test=args.max_test, embed_seconds=embed_seconds,
                           threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                           load_at_start=load, note=args.note,
                           train_images={o.name: len(o.train) for o in objects},
                           test_images={o.name: len(o.labels) for o in objects})
    out = Path(args.out + args.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result.to_json(), indent=1))
    write_markdown(result, out)
    if args.report:
        write_incremental_report(out.with_suffix(".html"), result)


def combine(paths: list[str], out: Path, report: bool = False) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for run in runs[1:]:
        if run["steps"] != first["steps"] or run["schedule"] != first["schedule"]:
            raise SystemExit("runs to combine must share the schedule and the objects")
    result = IncrementalResult(first["schedule"], first["steps"], first["settings"], {}, {})
    for run in runs:
        result.methods.update(run["methods"])
        result.routing.update(run["routing"])
        result.settings.setdefault("runs", []).append({"methods": list(run["methods"]), "params": run["settings"]["params"]})
        if any(method.startswith("iuf") for method in run["methods"]):
            result.settings["params"] = {**result.settings["params"], "iuf": run["settings"]["params"]["iuf"]}
    out.with_suffix(".json").write_text(json.dumps(result.to_json(), indent=1))
    write_markdown(result, out)
    if report:
        write_incremental_report(out.with_suffix(".html"), result)


def write_markdown(result: IncrementalResult, out: Path) -> None:
    settings = result.settings
    objects = settings["objects"]
    routing = result.routing
    params = settings["params"]
    notes = [f"Objects: {len(objects)} ({', '.join(objects)}); steps: {len(result.steps)}; "
             f"{settings['size']} px; ≤ {settings['max_train']} training and ≤ {settings['max_test']} test images per "
             f"object (half normal, half anomalous); IUF {params['iuf']['steps']} steps per object; bank size "
             f"{params['patchcore']['bank_size']}; pixel AUROC at {EVAL_SIDE}×{EVAL_SIDE}. Timings on a 2-core machine "
             f"shared with other jobs ({_load(settings)}): upper bounds.", ""]
    if settings.get("note"):
        notes += [settings["note"], ""]
    if routing:
        notes += [f"Unified bank routing: {100 * routing['accuracy']:.2f} % of {routing['images']} test images of known "
                  f"products go to their product; {routing['ms_per_image']:.3f} ms per image beyond the backbone; "
                  f"normal images called unknown {100 * routing['normal_called_unknown']:.1f} %, anomalous "
                  f"{100 * routing['anomalous_called_unknown']:.1f} %."]
        if "unknown_after_step_1" in routing:
            unknown = routing["unknown_after_step_1"]
            notes += [f"Unknown products: after step 1, {100 * unknown['flagged_unknown']:.1f} % of the "
                      f"{unknown['images']} test images of the not-yet-learned objects are flagged unknown.", ""]
    out.with_suffix(".md").write_text(markdown(result).replace("\n\n", "\n\n" + "\n".join(notes) + "\n\n", 1))
    print(out.with_suffix(".md").read_text())


def _load(settings: dict) -> str:
    """The load average when the run started (runs before it was recorded: ~35)."""
    return f"load {settings['load_at_start']:.1f} at the start" if "load_at_start" in settings else "load ~35"


if __name__ == "__main__":
    main()
