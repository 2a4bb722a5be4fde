"""Speed and memory of the default detector as a user meets it: CLI processes against the bare forward.

    python benchmarks/speed.py [--train 200] [--test 300] [--repeats 3] [--setups 256,512,tiles] [--param search=ivf]

For each setup (256 px and 512 px squashed, geometry=tiles at 256 px on BSData's native 1130×460:
the default's geometry), in one run:

- fit: `defectlens fit` of --train BSData train images as a process, backbone on PyTorch and on
  the exported runtime that `--runtime auto` takes once an export is cached;
- decode: reading the --test images (PIL), in this process;
- bare forward per runtime: decode + resize + the backbone forward (batches of 8) in this process,
  nothing else: the floor a predict process can approach; "bare" below is the ONNX Runtime one;
- predict per runtime: the whole `defectlens predict MODEL TEST --csv` process (start, imports,
  model load, decode, forward, kNN, CSV), and again with `--maps` (every map written as .npy);
  wall time and the process's peak RSS (from wait4), and the ratio to the bare ONNX forward.

Exports are made into a private cache first, so no timed process pays for one. Every figure is
the median of --repeats runs. Writes --out (default benchmarks/results/speed.md) with the
machine, the date and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from defectlens.models import default_config, describe_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "datasets" / "bsdata" / "ball_screw"
SETUPS = {"256": {"size": 256, "geometry": "square"}, "512": {"size": 512, "geometry": "square"},
          "tiles": {"size": 256, "geometry": "tiles"}}
RUNTIMES = ("torch", "onnx", "openvino")


def run_process(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one process; its output is dropped unless it fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{log.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def median_process(command: list[str], env: dict, repeats: int) -> tuple[float, float]:
    runs = [run_process(command, env) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def linked_folder(folder: Path, files: list[Path]) -> Path:
    """A folder of links to ``files`` (fit and predict take folders), names kept unique."""
    folder.mkdir(parents=True)
    for index, path in enumerate(files):
        (folder / f"{index:05d}-{path.parent.name}-{path.name}").symlink_to(path.resolve())
    return folder


def installed_runtimes() -> list[str]:
    from defectlens.runtime import installed

    return [name for name in RUNTIMES if installed(name)]


def bare_ms(model: Path, paths: list[Path], runtime: str | None, repeats: int) -> float:
    """Median ms/img of decode (+ resize + forward when ``runtime`` is given) in this process."""
    import torch

    from defectlens.data.io import read_image
    from defectlens.models import Detector
    from defectlens.runtime import load_runtime

    detector = Detector.load(model)
    if runtime is not None:
        detector = load_runtime(detector, runtime)
        detector.embed_images([read_image(paths[0])])  # warm-up: weights in memory, kernels chosen
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(paths), 8):
                images = [read_image(path) for path in paths[start : start + 8]]
                if runtime is not None:
                    detector.embed_images(images)
        timings.append((time.perf_counter() - started) / len(paths) * 1000)
    return statistics.median(timings)


def benchmark_setup(name: str, params: dict, train: Path, test: Path, work: Path, env: dict, runtimes: list[str],
                    repeats: int, method: str | None) -> list[tuple[str, str, str]]:
    cli = [sys.executable, "-m", "defectlens.cli"]
    options = ["--size", str(params["size"])] + [f"--param={k}={v}" for k, v in params.items() if k != "size"]
    options += ["--method", method] if method else []
    model = work / f"{name}.dlens"
    subprocess.run(cli + ["fit", str(train), "-o", str(model), "--runtime", "torch", *options], env=env, check=True,
                   capture_output=True)
    for runtime in runtimes[1:]:  # exports into the private cache, outside every timing
        subprocess.run(cli + ["predict", str(model), str(sorted(test.iterdir())[0]), "--runtime", runtime], env=env,
                       check=True, capture_output=True)
    count_train, count_test = len(list(train.iterdir())), len(list(test.iterdir()))
    rows = []
    for runtime in ("torch", "auto"):
        seconds, rss = median_process(cli + ["fit", str(train), "-o", str(work / "refit.dlens"), "--overwrite",
                                             "--runtime", runtime, *options], env, repeats)
        rows.append((f"fit, {count_train} images, --runtime {runtime}", f"{seconds:.1f} s", f"{rss:.0f} MB"))
    paths = sorted(test.iterdir())
    decode = bare_ms(model, paths, None, repeats)
    rows.append((f"decode, {count_test} images", f"{decode:.2f} ms/img", ""))
    bare = {runtime: bare_ms(model, paths, runtime, repeats) for runtime in runtimes}
    for runtime in runtimes:
        rows.append((f"bare: decode + resize + {runtime} forward", f"{bare[runtime]:.2f} ms/img", ""))
    reference = bare.get("onnx")
    for runtime in runtimes:
        for label, extra in (("CSV", []), ("CSV + maps", ["--maps", str(work / "maps")])):
            shutil.rmtree(work / "maps", ignore_errors=True)
            seconds, rss = median_process(cli + ["predict", str(model), str(test), "--csv", str(work / "p.csv"), "--overwrite",
                                                 "--runtime", runtime, *extra], env, repeats)
            per_image = seconds / count_test * 1000
            ratio = f"; {per_image / reference:.2f}× bare" if reference else ""
            rows.append((f"predict process, --runtime {runtime}, {label}", f"{seconds:.2f} s = {per_image:.1f} ms/img{ratio}",
                         f"{rss:.0f} MB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--method", default=None, help="default: what `fit` picks without --method for --train images")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a detector parameter added to every setup (repeatable), as `fit --param` takes it")
    parser.add_argument("--out", default=str(HERE / "results" / "speed.md"))
    args = parser.parse_args()
    extra = dict(pair.split("=", 1) for pair in args.param)
    root = Path(args.data)
    if not (root / "train" / "good").is_dir():
        sys.exit(f"{root}: no train/good folder (BSData ball_screw in MVTec layout expected)")
    train_files = sorted((root / "train" / "good").iterdir())[: args.train]
    test_files = sorted(p for p in (root / "test").rglob("*") if p.is_file())[: args.test]
    runtimes = installed_runtimes()
    method = args.method or f"{describe_config(*default_config())} (the default)"
    sections = []
    with tempfile.TemporaryDirectory(prefix="defectlens-speed-") as folder:
        work = Path(folder)
        train = linked_folder(work / "train", train_files)
        test = linked_folder(work / "test", test_files)
        env = {**os.environ, "DEFECTLENS_CACHE": str(work / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        os.environ["DEFECTLENS_CACHE"] = env["DEFECTLENS_CACHE"]  # the in-process bare forwards use the same exports
        for name in args.setups.split(","):
            params = {**SETUPS[name], **extra}
            print(f"setup {name} ...", file=sys.stderr, flush=True)
            rows = benchmark_setup(name, params, train, test, work / name, env, runtimes, args.repeats, args.method)
            described = ", ".join(f"{k}={v}" for k, v in params.items())
            table = "\n".join(["| step | time | peak RSS |", "|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows])
            sections.append(f"## {name}: {method} ({described})\n\n{table}\n")
            print(sections[-1], flush=True)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    cores = len(os.sched_getaffinity(0))
    text = (f"# Speed and memory of `defectlens fit` and `predict`: {method}\n\n`{command}` on "
            f"{platform.machine()} ({platform.processor() or platform.platform()}), {cores} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}; BSData ball_screw, {len(train_files)} train and "
            f"{len(test_files)} test images (1130×460 JPEG); runtimes {', '.join(runtimes)}; medians of {args.repeats} runs. "
            "\"bare\" = decode + resize + ONNX Runtime forward in one process (see the module doc).\n\n" + "\n".join(sections))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
