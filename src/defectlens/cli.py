"""Command line: fit, predict, benchmark, generate, demo. A thin shell over the Python API."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, no traceback."""


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it")


def parse_params(pairs: list[str] | None, backbone: str | None = None) -> dict:
    """--param KEY=VALUE (repeatable) -> method keyword arguments; VALUE is read as JSON when it
    parses (numbers, true/false, lists), otherwise kept as a string (paths, names)."""
    params = {"backbone": backbone} if backbone else {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param bank_size=8192")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _check_params(method: str, params: dict) -> None:
    import inspect

    from .models import REGISTRY

    accepted = set()
    for cls in REGISTRY[method].__mro__:
        if "__init__" in vars(cls):
            accepted |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise UsageError(f"{method} has no parameter {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")


# -- fit ----------------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from .engine.fit import fit_from_folder

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite)
    params = parse_params(args.param, args.backbone)
    _check_params(args.method, params)
    started = time.perf_counter()
    detector, paths = fit_from_folder(args.data, method=args.method, shots=args.shots, seed=args.seed, size=args.size, **params)
    detector.save(output)
    if detector.threshold is not None:
        threshold = f"{detector.threshold:.4g}"
    elif detector.zero_shot and detector.predict_chunk is None:
        threshold = "set from each predicted batch (override with --threshold)"
    else:
        threshold = "none (needs at least 3 held-out normal scores; pass --threshold to predict)"
    kind = "labelled" if getattr(detector, "trains_on_anomalies", False) and args.shots is None else "normal"
    print(f"fitted {detector.name} on {len(paths)} {kind} images in {time.perf_counter() - started:.1f} s; "
          f"threshold {threshold}; saved {output}")
    return 0


# -- predict ------------------------------------------------------------------------------------
def _unique_stem(path: Path, used: set[str]) -> str:
    stem, count = path.stem, 1
    while stem in used:
        stem, count = f"{path.stem}_{count}", count + 1
    used.add(stem)
    return stem


def _small(part_map: np.ndarray, side: int = 256) -> np.ndarray:
    """A part map shrunk for a report tile: every image's panel stays in memory until the end."""
    import cv2

    scale = min(1.0, side / max(part_map.shape))
    height, width = (max(1, round(n * scale)) for n in part_map.shape)
    return cv2.resize(part_map.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)


def cmd_predict(args) -> int:
    from .engine.predict import collect_inputs, predict_paths
    from .models import Detector
    from .report import ImageRecord, colorize_parts, heatmap_overlay, save_png, write_report

    detector = Detector.load(args.model)
    if args.runtime != "torch" and not args.dask:
        from .runtime import load_runtime

        detector = load_runtime(detector, args.runtime, export_dir=args.export_dir)
    paths = collect_inputs(args.inputs)
    if not paths:
        raise UsageError("no input images found in " + ", ".join(args.inputs))
    for target in (args.csv, args.report):
        if target:
            _refuse_overwrite(Path(target), args.overwrite)
    for folder in (args.maps, args.overlays):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)

    rows, records, failed, used_stems = [], [], 0, set()
    if args.dask:
        from .engine.dask import predict_paths_dask

        results = predict_paths_dask(args.model, paths, args.dask, runtime=args.runtime, keep_images=bool(args.overlays))
    else:
        results = predict_paths(detector, paths, keep_images=bool(args.overlays))
    for result in results:
        # Read after each batch: zero-shot musc sets both from the batch it has just scored.
        map_range = detector.map_range
        threshold = args.threshold if args.threshold is not None else detector.threshold
        label = ""
        if result.error:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
        elif threshold is not None:
            label = "anomalous" if result.score > threshold else "normal"
        rows.append({"path": str(result.path), "score": "" if result.score is None else f"{result.score:.6g}",
                     "label": label, "error": result.error or ""})
        if result.error is None:
            stem = _unique_stem(result.path, used_stems)
            if args.maps and result.anomaly_map is not None:
                target = Path(args.maps) / f"{stem}.npy"
                _refuse_overwrite(target, args.overwrite)
                np.save(target, result.anomaly_map.astype(np.float32))
            if args.overlays and result.anomaly_map is not None:
                target = Path(args.overlays) / f"{stem}.png"
                _refuse_overwrite(target, args.overwrite)
                low, high = map_range or (float(result.anomaly_map.min()), float(result.anomaly_map.max()) + 1e-6)
                save_png(target, heatmap_overlay(result.image, result.anomaly_map, low, high))
            if args.report:
                panels = {} if result.part_map is None else {"parts": colorize_parts(_small(result.part_map))}
                records.append(ImageRecord(path=str(result.path), score=result.score, label=None,
                                           anomaly_map=result.anomaly_map, extra_panels=panels))
        if not args.csv:
            print(f"{result.path}\t{rows[-1]['score'] or 'ERROR'}\t{label}")

    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "score", "label", "error"])
            writer.writeheader()
            writer.writerows(rows)
    if args.report:
        write_report(args.report, title=f"defectlens predictions — {detector.name}", records=records, threshold=threshold,
                     notes=[f"model: {args.model}", f"{len(rows)} inputs, {failed} failed"],
                     map_range=map_range)
    anomalous = sum(r["label"] == "anomalous" for r in rows)
    print(f"{len(rows)} images: {anomalous} anomalous, {len(rows) - anomalous - failed} normal"
          f"{'' if threshold is not None else ' (no threshold: labels left empty)'}, {failed} failed", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else 0


def cmd_export(args) -> int:
    from .models import Detector
    from .runtime import export_model, read_spec

    out = export_model(Detector.load(args.model), args.output, args.format, overwrite=args.overwrite)
    spec = read_spec(out)
    print(f"wrote {out}: {spec['backbone']} at {spec['input_hw'][0]}×{spec['input_hw'][1]} px, {args.format}, "
          f"largest feature difference from PyTorch {spec['max_feature_difference']:.2g}")
    return 0


# -- benchmark ----------------------------------------------------------------------------------
TABLE_COLUMNS = ["shots", "seeds", "image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro",
                 "fpr_at_threshold", "tpr_at_threshold", "fit_seconds", "score_ms_per_image"]


def cmd_benchmark(args) -> int:
    from .engine.benchmark import (
        format_table,
        markdown_table,
        parse_shots,
        run_benchmark,
    )
    from .report import write_report

    for target in (args.json, args.report):
        if target:
            _refuse_overwrite(Path(target), args.overwrite)
    params = parse_params(args.param, args.backbone)
    _check_params(args.method, params)
    result = run_benchmark(args.data, kind=args.dataset, method=args.method, shots=parse_shots(args.shots),
                           seeds=args.seeds, size=args.size, params=params)
    records, threshold = result.pop("_records"), result.pop("_threshold")
    table = format_table(result["summary"], result["n_train"])
    extra = [c for c in table[0] if c.startswith(("image_auroc[", "au_spro"))] if table else []
    print(f"{result['method']} on {result['dataset']} ({result['n_train']} train, {result['n_test']} test, size {result['size']})")
    print(markdown_table(table, TABLE_COLUMNS + extra))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_json_default))
    if args.report and records:
        last = result["runs"][-1]
        write_report(args.report, title=f"defectlens benchmark — {result['method']} on {result['category']}",
                     records=records, threshold=threshold, metrics=last["metrics"], table=table,
                     table_title="k-shot protocol (mean ± std over seeds)",
                     notes=[f"data: {result['dataset']}", f"backbone {result['backbone']} at {result['size']} px",
                            f"examples and curves: the last run ({last['shots']} shots, seed {last['seed']})"])
        print(f"report: {args.report}")
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


# -- generate and demo --------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .data.synthetic import generate

    folders = generate(args.out, kind=args.kind, seed=args.seed, size=args.size, overwrite=args.overwrite)
    print("wrote " + ", ".join(str(f) for f in folders))
    return 0


def cmd_synthesize(args) -> int:
    from .synthesis.run import synthesize_folder

    params = parse_params(args.param)
    started = time.perf_counter()
    manifest = synthesize_folder(args.data, args.out, kind=args.kind, count=args.n, seed=args.seed,
                                 anomalies=args.anomalies, textures=args.textures, params=params, overwrite=args.overwrite)
    seconds = time.perf_counter() - started
    held = f"; {len(manifest['held_out'])} anomaly examples used, listed under held_out" if manifest["held_out"] else ""
    print(f"wrote {args.n} {args.kind} anomalies to {args.out} in {seconds:.1f} s ({args.n / seconds:.2f} images/s){held}; "
          f"boxes and sources in {Path(args.out) / 'synthesis.json'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), overwrite=args.overwrite)


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_METHOD, REGISTRY

    parser = argparse.ArgumentParser(prog="defectlens", description="Industrial visual anomaly detection on a CPU.")
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    methods = sorted(REGISTRY)

    fit = commands.add_parser("fit", help="learn normal appearance from good images and save a model file")
    fit.add_argument("data", help="an MVTec-style category folder (its train/good is used) or a folder of normal images")
    fit.add_argument("-o", "--output", required=True, help="model file to write")
    fit.add_argument("--method", default=DEFAULT_METHOD, choices=methods, help=f"default: {DEFAULT_METHOD}")
    fit.add_argument("--shots", type=int, default=None, help="use only K normal images (picked with --seed); 0 = zero-shot methods")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--size", type=int, default=None,
                     help="input size in pixels (default: the method's own, 256 for the embedded backbone, 240 for winclip)")
    fit.add_argument("--backbone", default=None, help="efficientnet-lite0 (default), efficientnet-lite1, efficientnet-lite2")
    fit.add_argument("--param", action="append", metavar="KEY=VALUE",
                     help="a method parameter, repeatable (e.g. --param bank_size=8192)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    fit.set_defaults(func=cmd_fit)

    predict = commands.add_parser("predict", help="score images with a saved model")
    predict.add_argument("model")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    predict.add_argument("--csv", help="write path,score,label(,error) rows here")
    predict.add_argument("--maps", help="write <stem>.npy anomaly maps (float32, image height × width) here")
    predict.add_argument("--overlays", help="write <stem>.png heatmap overlays here")
    predict.add_argument("--report", help="write an HTML report of the predictions here")
    predict.add_argument("--threshold", type=float, default=None, help="override the model's threshold")
    predict.add_argument("--overwrite", action="store_true", help="replace existing output files")
    predict.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                         help="where the backbone runs; auto (default): the fastest installed, exported once into the cache")
    predict.add_argument("--export-dir", default=None, help="an export folder from `defectlens export` to run on")
    predict.add_argument("--dask", metavar="SCHEDULER", default=None,
                         help="score on a Dask cluster: local, local:N (N worker processes) or a scheduler address (see docs/scale.md)")
    predict.set_defaults(func=cmd_predict)

    export = commands.add_parser("export", help="export a model's backbone feature graph to ONNX or OpenVINO (checked against PyTorch)")
    export.add_argument("model")
    export.add_argument("-o", "--output", required=True, help="export folder to write")
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    export.set_defaults(func=cmd_export)

    bench = commands.add_parser("benchmark", help="k-shot protocol on a labelled dataset: shots × seeds, mean ± std")
    bench.add_argument("data")
    bench.add_argument("--dataset", default="auto", choices=["auto", "mvtec", "loco", "visa", "folder"])
    bench.add_argument("--method", default=DEFAULT_METHOD, choices=methods)
    bench.add_argument("--shots", default="1,2,4,8,full", help="comma list; 0 = zero-shot, 'full' = every training image (default 1,2,4,8,full)")
    bench.add_argument("--seeds", type=int, default=5)
    bench.add_argument("--size", type=int, default=None, help="input size in pixels (default: the method's own)")
    bench.add_argument("--backbone", default=None)
    bench.add_argument("--param", action="append", metavar="KEY=VALUE", help="a method parameter, repeatable")
    bench.add_argument("--json", help="write all runs and the summary as JSON")
    bench.add_argument("--report", help="write an HTML report")
    bench.add_argument("--overwrite", action="store_true")
    bench.set_defaults(func=cmd_benchmark)

    gen = commands.add_parser("generate", help="write a synthetic MVTec- or LOCO-layout dataset")
    gen.add_argument("out")
    gen.add_argument("--kind", default="mvtec", choices=["mvtec", "loco"])
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=256)
    gen.add_argument("--overwrite", action="store_true")
    gen.set_defaults(func=cmd_generate)

    synth = commands.add_parser("synthesize", help="write synthetic anomalies (image, mask, box) made from normal images")
    synth.add_argument("data", help="an MVTec-style category folder (train/good are the normal images) or a folder of images")
    synth.add_argument("out", help="output folder: images/, masks/, synthesis.json")
    synth.add_argument("--kind", default="perlin", choices=["perlin", "cutpaste", "anogen", "diffusion"])
    synth.add_argument("-n", type=int, default=16, help="how many anomalous images to write (default 16)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--anomalies", type=int, default=3,
                       help="anogen/diffusion: real anomalous test images (with masks) to learn from (default 3)")
    synth.add_argument("--textures", help="perlin: a folder of images to take foreign textures from (default: procedural)")
    synth.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="a synthesizer parameter, repeatable (e.g. --param blend=alpha, --param sd_model=PATH)")
    synth.add_argument("--overwrite", action="store_true", help="replace earlier synthesize output in OUT")
    synth.set_defaults(func=cmd_synthesize)

    demo = commands.add_parser("demo", help="generate data, fit, predict, benchmark and report: the whole job, offline")
    demo.add_argument("--out", default="defectlens-demo", help="output folder (default ./defectlens-demo)")
    demo.add_argument("--overwrite", action="store_true", help="reuse an output folder that is not a previous demo's")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.io import ImageReadError
    from .models import ModelFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileExistsError, FileNotFoundError, ModelFileError, ImageReadError, RuntimeError,
            NotImplementedError) as error:
        print(f"defectlens {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
