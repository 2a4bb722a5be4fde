"""Command line: fit, predict, benchmark, generate, demo. A thin shell over the Python API."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import select
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

from . import __version__
from .errors import DefectlensError, UsageError

EXIT_OK = 0
#: Some inputs could not be scored (each has a row with its reason); the others were.
EXIT_INPUT_FAILED = 1
#: The command could not start: bad options, a bad model file, an output target in the way.
EXIT_USAGE = 2
#: A bug in defectlens: the message says so and ``--debug`` shows the traceback.
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_OUTPUT_CLOSED = 141  # as a shell reports a command ended by SIGPIPE
#: ``benchmark``'s protocol unless --shots / --seeds say otherwise.
DEFAULT_SHOTS, DEFAULT_SEEDS = "1,2,4,8,full", 5
#: predict's stdout lines are tab-separated: what a file name's own tabs and breaks become there.
TSV_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def parse_params(pairs: list[str] | None) -> dict:
    """--param KEY=VALUE (repeatable) -> method keyword arguments; VALUE is read as JSON when it
    parses (numbers, true/false, null, lists), otherwise kept as a string (paths, names)."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param bank_size=8192")
        if key.strip() in params:
            raise UsageError(f"--param {key.strip()} is given twice: give it once")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def given_params(args) -> dict:
    """The parameters the user gave: --param and the flags that are shortcuts for some of them
    (--size, --backbone), not yet checked against a method."""
    params = parse_params(args.param)
    if "seed" in params:
        raise UsageError("--param seed: pass --seed S instead (it picks the shots and seeds the method)")
    for flag in ("size", "backbone"):
        value = getattr(args, flag)
        if value is not None:
            if flag in params and params[flag] != value:
                raise UsageError(f"--{flag} {value} and --param {flag}={params[flag]} disagree: give one of them")
            params[flag] = value
    return params


def method_params(args) -> dict:
    """``given_params``, checked against the method's parameters before any work starts."""
    from .models import REGISTRY

    params = given_params(args)
    REGISTRY[args.method].check_params({"seed": getattr(args, "seed", 0), **params})
    return params


def resolved_params(args, shots: int | None) -> tuple[dict, str]:
    """The method's parameters (see method_params); without --method, args.method becomes the
    default's for that many good images and its parameters join (engine.fit.default_config_for),
    and the second value says in words what was taken and why ("" when a method was named)."""
    from .engine.fit import default_config_for
    from .models import describe_config

    if args.method is not None:
        return method_params(args), ""
    args.method, defaults, reason = default_config_for(args.data, shots, given_params(args))
    params = {**defaults, **method_params(args)}  # the given values, checked against the default's method
    return params, f"{describe_config(args.method, {key: params[key] for key in defaults})} ({reason})"


# -- fit ----------------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from .engine.allocator import keep_freed_memory
    from .engine.fit import fit_from_folder
    from .models import DEFAULT_METHOD, REGISTRY, LearningType
    from .models.calibration import MIN_SCORES

    from .engine.outputs import check_output_file

    output = check_output_file(args.output, overwrite=args.overwrite, what="model file", data=args.data)
    keep_freed_memory()
    if args.update or hasattr(REGISTRY[args.method or DEFAULT_METHOD], "partial_fit"):
        return fit_products_command(args, output)
    params, chosen = resolved_params(args, args.shots)
    started = time.perf_counter()
    detector, training = fit_from_folder(args.data, method=args.method, shots=args.shots, seed=args.seed, params=params,
                                         runtime=args.runtime)
    if args.target_fpr is not None:
        try:
            detector.set_operating_point(args.target_fpr)
        except UsageError as error:  # the fit is not lost to it
            detector.save(output)
            raise UsageError(f"{error}; the fitted model is saved at {output} without --target-fpr's threshold") from None
    detector.save(output)
    if detector.threshold is not None:
        threshold = f"{detector.threshold:.4g} ({operating_point_text(detector)})"
    elif detector.predict_chunk is None:
        threshold = f"set from each predicted batch of {MIN_SCORES} images or more (override with --threshold)"
    else:
        threshold = f"none (needs at least {MIN_SCORES} held-out normal scores; pass --threshold to predict)"
    anomalous = len(training.labels) - training.normal_count
    kind = (f"{training.normal_count} normal and {anomalous} anomalous" if anomalous
            else f"{training.normal_count} normal")
    zero = " (zero-shot)" if not training.images and detector.learning_type == LearningType.ZERO_SHOT else ""
    if chosen:
        print(f"took {chosen}; --method picks another")
    if args.shots and training.normal_count < args.shots:
        from .data.io import printable

        print(f"--shots {args.shots}: {printable(args.data)} holds {training.normal_count} normal training images; "
              "all of them were used", file=sys.stderr)
    print(f"fitted {detector.name} on {kind} images{zero} in {time.perf_counter() - started:.1f} s; "
          f"threshold {threshold}; saved {output}")
    return 0


def fit_products_command(args, output) -> int:
    """fit for models that learn products one at a time (unified, iuf): each category of DATA is
    one product; with --update, the products are added to a copy of an existing model."""
    from .engine.incremental import fit_products
    from .models import DEFAULT_METHOD, Detector, create_detector

    started = time.perf_counter()
    if args.update:
        given = [flag for flag, value in (("--method", args.method), ("--size", args.size), ("--backbone", args.backbone),
                                          ("--param", args.param), ("--shots", args.shots)) if value is not None]
        if given:
            raise UsageError(f"--update keeps the model's own method and parameters; drop {', '.join(given)}")
        detector = Detector.load(args.update)
        if not hasattr(detector, "partial_fit"):
            raise UsageError(f"{args.update}: a '{detector.name}' model cannot learn new products; "
                             f"fit one with --method unified or --method iuf")
    else:
        if args.shots is not None:
            raise UsageError(f"--shots: {args.method} learns every normal image of each product")
        args.method = args.method or DEFAULT_METHOD
        detector = create_detector(args.method, **{"seed": args.seed, **method_params(args)})
    known = list(getattr(detector, "products", []))
    try:
        fit_products(detector, args.data, on_product=lambda name, count: print(f"learned product {name} ({count} normal images)"))
    except KeyboardInterrupt:
        if len(getattr(detector, "products", [])) <= len(known) or not detector._fitted:
            raise
        print("interrupted: saving the products learned so far", file=sys.stderr)
    detector.save(output)
    added = [p for p in detector.products if p not in known]
    threshold = "none (too few held-out normal images)" if detector.threshold is None else f"{detector.threshold:.4g}"
    print(f"{detector.name} model with products {', '.join(detector.products)} (added {', '.join(added)}) "
          f"in {time.perf_counter() - started:.1f} s; threshold {threshold}; saved {output}")
    return 0


def operating_point_text(detector) -> str:
    """What a threshold set from held-out normal scores means, in a user's words."""
    count = 0 if detector.normal_scores is None else len(detector.normal_scores)
    return (f"flags about {detector.operating_fpr * 100:g} % of good parts; set from {count} held-out normal scores; "
            "choose another rate with --target-fpr")


# -- predict ------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from .data.io import printable, scan_inputs
    from .engine.outputs import PredictionOutputs
    from .engine.predict import predict_to_outputs
    from .models import Detector

    outputs = PredictionOutputs(csv=args.csv, maps=args.maps, overlays=args.overlays, report=args.report,
                                overwrite=args.overwrite, resume=args.resume)
    detector = Detector.load(args.model)
    if args.runtime != "torch" and not args.dask:
        from .runtime import load_runtime

        detector = load_runtime(detector, args.runtime, export_dir=args.export_dir)
    if args.target_fpr is not None:
        if args.threshold is not None:
            raise UsageError("--threshold and --target-fpr both set the threshold: give one of them")
        threshold = detector.set_operating_point(args.target_fpr)
        print(f"threshold {threshold:.4g}: {operating_point_text(detector)}", file=sys.stderr)
    scan = scan_inputs(args.inputs)
    if scan.skipped:
        print(scan.skipped_summary(), file=sys.stderr)
    if scan.duplicates:
        print(f"{scan.duplicates} inputs named more than once, scored once", file=sys.stderr)
    if not scan.paths:
        raise UsageError("no input images found in " + ", ".join(map(printable, args.inputs)))
    score_paths = client = None
    if args.dask:  # connected before any output is written: a wrong address leaves nothing behind
        from .engine.dask import close, connect, predict_paths_dask

        client = connect(args.dask)
        score_paths = partial(predict_paths_dask, args.model, scheduler=client, runtime=args.runtime)

    def show(row: dict) -> None:
        if row["error"]:
            print(f"error: {printable(row['error'])}", file=sys.stderr)
        if not args.csv:
            # A tab or line break in a file name would split the line: written as \t, \n, \r.
            path = printable(row["path"]).translate(TSV_ESCAPES)
            print(f"{path}\t{row['score'] or 'ERROR'}\t{row['label']}", flush=True)

    max_pixels = None if args.max_megapixels is None else round(args.max_megapixels * 1e6)
    try:
        summary = predict_to_outputs(detector, scan.paths, outputs, threshold=args.threshold, max_pixels=max_pixels,
                                     report_title=f"defectlens predictions — {detector.name}",
                                     report_notes=[f"model: {args.model}"], on_row=show, score_paths=score_paths)
    except KeyboardInterrupt:
        if args.csv:
            print(f"interrupted: the rows written so far are in {printable(args.csv)}; run the same command with "
                  "--resume instead of --overwrite to carry on", file=sys.stderr)
        raise
    finally:
        if client is not None:
            close(client)
    rows, failed = summary.rows, summary.failed
    resumed = f" ({summary.resumed} from the earlier run)" if summary.resumed else ""
    print(f"{len(rows)} images{resumed}: {summary.anomalous} anomalous, {len(rows) - summary.anomalous - failed} normal"
          f"{'' if summary.threshold is not None else ' (no threshold: labels left empty)'}, {failed} failed",
          file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else EXIT_OK


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .models import REGISTRY, describe_config
    from .models.base import checked_method
    from .models.modelfile import describe_model_file

    info = describe_model_file(args.model)
    checked_method(info["method"], info["params"], args.model)  # what load refuses, info refuses
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    method, params = info["method"], info["params"]
    # Parameters the file sets away from the method's defaults; all of them with --json.
    defaults = REGISTRY[method]().get_params() if method in REGISTRY else {}
    changed = {key: value for key, value in params.items() if key not in defaults or defaults[key] != value}
    rest = "other parameters" if changed else "all parameters"
    print(f"{args.model}: {describe_config(method, changed)} ({rest} at the method's defaults), "
          f"model file format {info['format_version']}, {info['bytes'] / 2**20:.1f} MiB")
    if info["products"] is not None:
        print(f"{len(info['products'])} products: {', '.join(info['products'])}")
    scores = info["normal_scores"]
    spread = (f", {scores['min']:.4g} to {scores['max']:.4g} (median {scores['median']:.4g})" if scores["count"] else "")
    print(f"{scores['count']} held-out normal scores{spread}")
    if info["threshold"] is None:
        print("threshold: none (fewer than 3 held-out normal scores); predict leaves labels empty unless given --threshold")
    else:
        print(f"threshold {info['threshold']:.4g}: flags about {info['operating_fpr'] * 100:g} % of good parts")
    points = [point for point in info["operating_points"] if point["threshold"] is not None]
    if points:
        print("other operating points (predict --target-fpr F):")
        for point in points:
            print(f"  F = {point['fpr']:<6g} threshold {point['threshold']:.4g}")
    if info["map_range"] is not None:
        low, high = info["map_range"]
        print(f"heatmap colour range {low:.4g} to {high:.4g}")
    print("stored tensors: " + ", ".join(f"{name} {'×'.join(map(str, tensor['shape']))} {tensor['dtype']}"
                                         for name, tensor in info["tensors"].items()))
    return 0


def cmd_export(args) -> int:
    from .models import Detector
    from .runtime import export_model, read_spec

    out = export_model(Detector.load(args.model), args.output, args.format, overwrite=args.overwrite)
    spec = read_spec(out)
    print(f"wrote {out}: {spec['backbone']} at {spec['input_hw'][0]}×{spec['input_hw'][1]} px, {args.format}, "
          f"largest feature difference from PyTorch {spec['max_feature_difference']:.2g}")
    return 0


# -- benchmark ----------------------------------------------------------------------------------
def cmd_benchmark(args) -> int:
    from .engine.allocator import keep_freed_memory
    from .engine.benchmark import (
        format_table,
        markdown_table,
        parse_shots,
        run_benchmark,
    )
    from .engine.outputs import check_output_file, same_file
    from .report import table_columns, write_benchmark_json, write_benchmark_report

    for target, flag in ((args.json, "--json"), (args.report, "--report")):
        if target:
            check_output_file(target, overwrite=args.overwrite, what=flag, data=args.data)
    if args.json and args.report and same_file(Path(args.json), Path(args.report)):
        raise UsageError("--json and --report name the same file")
    keep_freed_memory()
    if args.incremental:
        return incremental_benchmark_command(args)
    # Without --method: the default for the fewest images asked for, which every run can fit.
    shots = parse_shots(DEFAULT_SHOTS if args.shots is None else args.shots)
    counts = [count for count in shots if count not in ("full", 0)]
    params, chosen = resolved_params(args, min(counts) if counts else None)
    if chosen:
        print(f"took {chosen}")
    seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    result = run_benchmark(args.data, kind=args.dataset, method=args.method, shots=shots, seeds=seeds, params=params)
    table = format_table(result.summary, result.n_train)
    print(f"{result.method} on {result.dataset} ({result.n_train} train, {result.n_test} test, size {result.params.get('size')})")
    print(markdown_table(table, table_columns(table)))
    if args.json:
        write_benchmark_json(args.json, result)
    if args.report and result.records:
        write_benchmark_report(args.report, result, table)
        print(f"report: {args.report}")
    return 0


def incremental_benchmark_command(args) -> int:
    """benchmark --incremental SCHEDULE DATA: the unified incremental protocol (engine/incremental.py)."""
    from .backbones import DEFAULT_BACKBONE, get_backbone
    from .engine.incremental import default_params, load_objects, markdown, parse_schedule, run_incremental
    from .report import jsonable

    given = [flag for flag, value in (("--param", args.param), ("--method", args.method), ("--shots", args.shots),
                                      ("--seeds", args.seeds)) if value is not None]
    if given:
        raise UsageError(f"--incremental runs every method with its protocol settings on every image; drop {', '.join(given)}")
    parse_schedule(args.incremental)
    size = args.size or 128
    backbone = get_backbone(args.backbone or DEFAULT_BACKBONE, size)
    objects = load_objects([args.data], backbone, max_train=args.max_images, max_test=args.max_images)
    result = run_incremental(objects, args.incremental, backbone, default_params(size))
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(jsonable(result.to_json()), indent=1, allow_nan=False))
    if args.report:
        from .report.incremental import write_incremental_report

        write_incremental_report(args.report, result)
        print(f"report: {args.report}")
    return 0


# -- generate and demo --------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .data.generator import generate
    from .engine.outputs import check_output_folder

    check_output_folder(args.out)
    folders = generate(args.out, kind=args.kind, seed=args.seed, size=args.size, categories=args.categories,
                       overwrite=args.overwrite, photos=args.photos)
    print("wrote " + ", ".join(str(f) for f in folders))
    return 0


def cmd_synthesize(args) -> int:
    from .engine.outputs import check_output_folder
    from .synthesis.run import synthesize_folder

    check_output_folder(args.out)
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
    from .engine.allocator import keep_freed_memory

    keep_freed_memory()
    failed = run_demo(Path(args.out), overwrite=args.overwrite)
    return EXIT_INPUT_FAILED if failed else EXIT_OK


# -- serve --------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import os

    try:
        from .serve.config import ServeConfig, parse_model_specs
        from .serve.runner import export_good, run
    except ImportError as error:
        raise UsageError(f"serving needs the 'serve' extra ({error}): pip install \"defectlens[serve]\"") from None
    tokens = tuple(args.token or ()) + ((os.environ["DEFECTLENS_TOKEN"],) if os.environ.get("DEFECTLENS_TOKEN") else ())
    config = ServeConfig(models=parse_model_specs(args.models), data_dir=Path(args.data), db_url=args.db,
                         host=args.host, port=args.port, tokens=tokens, insecure=args.insecure, workers=args.workers,
                         queue=args.queue, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_pixels=int(args.max_pixels), max_batch=args.max_batch,
                         cors_origins=tuple(args.cors_origin or ()), runtime=args.runtime)
    if args.export_good:
        for name, count in export_good(config, args.export_good).items():
            print(f"{name}: {count} operator-confirmed good images in {Path(args.export_good) / name / 'train' / 'good'}")
        return 0
    config.check_exposure()  # before loading anything: the refusal is the first thing the user hears
    for name, path in config.models.items():
        if not path.is_file():
            raise UsageError(f"model {name}: {path} does not exist")
    run(config, max_connections=args.max_connections)
    return 0


# -- parser -------------------------------------------------------------------------------------
def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, not {text!r}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_METHOD, DEFAULT_PARAMS, MANY_IMAGES, REGISTRY, default_config, describe_config

    default_help = (f"{describe_config(DEFAULT_METHOD, DEFAULT_PARAMS)} below {MANY_IMAGES} good images, "
                    f"{describe_config(*default_config())} from {MANY_IMAGES} (the best means over the real-data suite)")
    parser = argparse.ArgumentParser(prog="defectlens", description="Industrial visual anomaly detection on a CPU.")
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    methods = sorted(REGISTRY)

    fit = commands.add_parser("fit", help="learn normal appearance from good images and save a model file")
    fit.add_argument("data", help="an MVTec-style category folder (its train/good is used) or a folder of normal images")
    fit.add_argument("-o", "--output", required=True, help="model file to write")
    fit.add_argument("--method", default=None, choices=methods,
                     help=f"default: {default_help}; unified and iuf learn each category of DATA as a product")
    fit.add_argument("--update", metavar="MODEL",
                     help="add the products (categories) of DATA to this unified/iuf model; -o names the new file")
    fit.add_argument("--shots", type=_count, default=None, help="use only K normal images (picked with --seed); 0 = zero-shot methods")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--size", type=int, default=None,
                     help="input size in pixels (default: the method's own, 256 for the embedded backbone, 240 for winclip)")
    fit.add_argument("--backbone", default=None, help="efficientnet-lite0 (default), efficientnet-lite1, "
                     "efficientnet-lite2, each optionally @STAGES (e.g. efficientnet-lite0@2,3,4; default 2,4), "
                     "dinov2[:MODEL][@LAYERS] (docs/dinov2.md)")
    fit.add_argument("--param", action="append", metavar="KEY=VALUE",
                     help="a method parameter, repeatable (e.g. --param bank_size=8192)")
    fit.add_argument("--target-fpr", type=_fraction, default=None,
                     help="operating point: the share of good parts the threshold may flag (default 0.01)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    fit.add_argument("--runtime", default="torch", choices=["auto", "torch", "onnx", "openvino"],
                     help="where the backbone embeds the training images; torch (default) makes the same model "
                          "file every time; auto: an exported runtime when the cache has one (predict makes it), "
                          "faster, but a coreset near-tie can pick a few other bank rows")
    fit.set_defaults(func=cmd_fit)

    predict = commands.add_parser("predict", help="score images with a saved model")
    predict.add_argument("model")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    predict.add_argument("--csv", help="write path,score,label,error,map,overlay,product rows here, one as each image "
                                       "is scored")
    predict.add_argument("--maps", help="write <stem>-<hash>.npy anomaly maps (float32, image height × width) here")
    predict.add_argument("--overlays", help="write <stem>-<hash>.png heatmap overlays here")
    predict.add_argument("--report", help="write an HTML report of the predictions here")
    predict.add_argument("--threshold", type=_finite_float, default=None, help="override the model's threshold")
    predict.add_argument("--target-fpr", type=_fraction, default=None,
                         help="threshold flagging about this share of good parts, from the model's held-out normal scores")
    predict.add_argument("--max-megapixels", type=_positive_float, default=None,
                         help="refuse images above this many megapixels (default 150; decoding holds the whole image)")
    predict.add_argument("--overwrite", action="store_true", help="replace existing output files")
    predict.add_argument("--resume", action="store_true",
                         help="carry on an interrupted run: keep the scored rows of --csv and skip those inputs")
    predict.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                         help="where the backbone runs; auto (default): the fastest installed, exported once into the cache")
    predict.add_argument("--export-dir", default=None, help="an export folder from `defectlens export` to run on")
    predict.add_argument("--dask", metavar="SCHEDULER", default=None,
                         help="score on a Dask cluster: local, local:N (N worker processes) or a scheduler address (see docs/scale.md)")
    predict.set_defaults(func=cmd_predict)

    info = commands.add_parser("info", help="what a model file holds: method, parameters, threshold and other operating points")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="everything as JSON, every parameter included")
    info.set_defaults(func=cmd_info)

    export = commands.add_parser("export", help="export a model's backbone feature graph to ONNX or OpenVINO (checked against PyTorch)")
    export.add_argument("model")
    export.add_argument("-o", "--output", required=True, help="export folder to write")
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    export.set_defaults(func=cmd_export)

    bench = commands.add_parser("benchmark", help="k-shot protocol on a labelled dataset: shots × seeds, mean ± std")
    bench.add_argument("data")
    bench.add_argument("--dataset", default="auto", choices=["auto", "mvtec", "loco", "visa", "folder"])
    bench.add_argument("--method", default=None, choices=methods,
                       help=f"default: as for fit, for the fewest --shots given ({default_help})")
    bench.add_argument("--shots", default=None, help="comma list; 0 = zero-shot, 'full' = every training image (default 1,2,4,8,full)")
    bench.add_argument("--seeds", type=_positive, default=None, help="shot draws per number of shots (default 5)")
    bench.add_argument("--size", type=int, default=None, help="input size in pixels (default: the method's own)")
    bench.add_argument("--backbone", default=None)
    bench.add_argument("--param", action="append", metavar="KEY=VALUE", help="a method parameter, repeatable")
    bench.add_argument("--incremental", metavar="SCHEDULE",
                       help="unified incremental protocol over DATA's categories, e.g. 10-1x5, 3x5, 10-5 (ACC/FM per method)")
    bench.add_argument("--max-images", type=_positive, default=None,
                       help="--incremental: at most this many training and test images per category")
    bench.add_argument("--json", help="write all runs and the summary as JSON")
    bench.add_argument("--report", help="write an HTML report (--incremental: ACC/FM, per-step tables and each "
                                        "object's AUROC across steps)")
    bench.add_argument("--overwrite", action="store_true")
    bench.set_defaults(func=cmd_benchmark)

    gen = commands.add_parser("generate", help="write a synthetic MVTec- or LOCO-layout dataset")
    gen.add_argument("out")
    gen.add_argument("--kind", default="mvtec", choices=["mvtec", "loco"])
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=256, help="image side in pixels, 64 to 4096 (default 256)")
    gen.add_argument("--categories", default=None, metavar="A,B,...|all",
                     help="MVTec-layout categories to write, comma-separated, or all (default fabric,washer); "
                          "others: brushed_metal, wood, tiles, leaf, leather, perforated_metal, screw, capsule, hex_nut, connector, gear; "
                          "--kind loco: assembly (default) and photo_assembly (needs --photos)")
    gen.add_argument("--photos", default=None, metavar="DIR",
                     help="photo_assembly only: a folder holding bsdata/ball_screw and deeppcb/pcb (e.g. ../shared/datasets); "
                          "needs the elpv-dataset package")
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
                       help="a synthesizer parameter, repeatable (e.g. --param blend=alpha or --param sd_model=PATH for anogen)")
    synth.add_argument("--overwrite", action="store_true", help="replace earlier synthesize output in OUT")
    synth.set_defaults(func=cmd_synthesize)

    demo = commands.add_parser("demo", help="generate data, fit, predict, benchmark and report: the whole job, offline")
    demo.add_argument("--out", default="defectlens-demo", help="output folder (default ./defectlens-demo)")
    demo.add_argument("--overwrite", action="store_true", help="reuse an output folder that is not a previous demo's")
    demo.set_defaults(func=cmd_demo)
    serve = commands.add_parser("serve", help="inspection service: REST API, history database, live dashboard")
    serve.add_argument("models", nargs="+", metavar="MODEL", help="model files, each PATH or NAME=PATH (name: the file stem)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--data", default="defectlens-serve",
                       help="folder for stored images and maps, and the SQLite database unless --db (default ./defectlens-serve)")
    serve.add_argument("--db", default=None, help="SQLAlchemy database URL, e.g. postgresql+psycopg://user:pw@host/db")
    serve.add_argument("--token", action="append",
                       help="API token (repeatable; DEFECTLENS_TOKEN is also read, and keeps the token out of `ps`)")
    serve.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without a token")
    serve.add_argument("--workers", type=_positive, default=1, help="prediction threads (default 1)")
    serve.add_argument("--queue", type=_count, default=32, help="requests that may wait for a worker; more get 503 (default 32)")
    serve.add_argument("--max-connections", type=_positive, default=256, help="open connections before uvicorn answers 503 (default 256)")
    serve.add_argument("--max-upload-mb", type=_positive_float, default=32.0, help="request body limit (default 32 MiB)")
    serve.add_argument("--max-pixels", type=_positive_float, default=40e6, help="pixels per image (default 40e6)")
    serve.add_argument("--max-batch", type=_positive, default=16, help="images per request (default 16)")
    serve.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (default: none)")
    serve.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                       help="where the backbone runs, as for predict; auto (default): the fastest installed, "
                            "exported once into the cache")
    serve.add_argument("--export-good", metavar="DIR",
                       help="do not serve: write each model's operator-confirmed good images to DIR/MODEL/train/good and exit")
    serve.set_defaults(func=cmd_serve)

    for command in commands.choices.values():
        # Also accepted after the command name; SUPPRESS keeps a sub-command from resetting it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


DEBUG_HELP = "show the full traceback of any error"


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0 all done, 1 some inputs failed (each has its
    reason), 2 a usage, configuration or output problem (one line), 3 an internal error."""
    # Building the parser imports torch and the methods: about 180,000 objects the cyclic
    # collector tracks, all alive as long as the process. Left on, the collector walked them
    # again and again while they were made and in every full collection after. Off while they
    # are made and frozen (never walked again) for the command's run: every command starts about
    # 0.2 s sooner (`info` A/B 0.90), the default's fit of 200 images took 6 % less with the same
    # model file, its 300-image predict 0-4 % less with the same CSV (farm-bench A/B calls;
    # benchmarks/results/speed.md).
    collecting = gc.isenabled()
    gc.disable()
    try:
        args = build_parser().parse_args(argv)
    finally:
        if collecting:
            gc.enable()
    freezing = gc.get_freeze_count() == 0  # a caller's own frozen objects are left as they are
    if freezing:
        gc.freeze()
    shown = warnings.formatwarning
    warnings.formatwarning = partial(_one_line_warning, shown)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = shown
        if freezing:
            gc.unfreeze()  # a caller in the same process gets its collector back as it was


def _one_line_warning(shown, message, category, filename, lineno, line=None) -> str:
    """defectlens's own warnings as one line for the user ("defectlens: warning: ..."), not Python's
    file, line and source; other libraries' warnings as ``shown`` formats them."""
    if f"{os.sep}defectlens{os.sep}" in filename:
        return f"defectlens: warning: {message}\n"
    return shown(message, category, filename, lineno, line)


def _run(args) -> int:
    try:
        return args.func(args)
    except DefectlensError as error:
        if args.debug:
            traceback.print_exc()
        print(f"defectlens {args.command}: error: {_printable(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as error:
        if not _stdout_closed():
            return _internal_error(args, error)
        return EXIT_OUTPUT_CLOSED  # the reader stopped reading (`| head`): not a bug, nothing to say
    except Exception as error:  # noqa: BLE001 - the last resort that tells a bug from a user mistake
        return _internal_error(args, error)


def _internal_error(args, error: BaseException) -> int:
    if args.debug:
        traceback.print_exception(error)
        hint = "the traceback is above"
    else:
        hint = "run again with --debug for the traceback"
    print(f"defectlens {args.command}: internal error (a bug in defectlens, please report it): "
          f"{type(error).__name__}: {_printable(error)}; {hint}", file=sys.stderr)
    return EXIT_INTERNAL


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (the pipe reports an error); if so,
    it is pointed at /dev/null so that the interpreter's last flush at exit does not fail again."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no fd (a caller's StringIO) or no poll()
        return False
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return closed


def _printable(error: BaseException) -> str:
    from .data.io import printable

    return printable(str(error))


if __name__ == "__main__":
    sys.exit(main())
