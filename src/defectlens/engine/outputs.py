"""Where batch prediction writes: checked before any scoring, written as each image finishes.

A batch can take hours, so every output target is checked up front (a typo in a folder name
must not surface after the last image), and the CSV gets one flushed row per image: Ctrl-C or
a crash keeps what was done, and ``resume`` carries on from it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.io import printable
from ..errors import OutputError, OutputExistsError, UsageError

#: The predictions CSV, a contract (docs/DESIGN.md): new columns go at the end. ``product``: the
#: product a multi-product model (unified) routed the image to, ``unknown`` when it belongs to none
#: of its products, empty for single-product models.
CSV_COLUMNS = ["path", "score", "label", "error", "map", "overlay", "product"]

#: Longest file-name stem kept in a map or overlay name, in bytes (file systems allow 255).
_STEM_BYTES = 120


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(folder: Path, what: str) -> None:
    """``folder`` exists as a writable folder, or can be made under one."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"{what} {printable(folder)}: {printable(existing)} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {printable(folder)}: no permission to write in {printable(existing)}")


def check_output_file(path: str | os.PathLike, *, overwrite: bool, what: str = "output file",
                      data: str | os.PathLike | None = None) -> Path:
    """Refuse a file target that cannot be written or would replace a file unasked; nor, even
    with ``overwrite``, a device, pipe or socket, or a file in the input folder ``data``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {printable(path)} is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{what} {printable(path)} already exists; pass --overwrite to replace it")
        if path.exists() and not path.is_file():
            raise OutputError(f"{what} {printable(path)} is not a regular file (a device, pipe or socket); give a file name")
        if data is not None and Path(data).is_dir() and _is_within(path, Path(data)):
            raise OutputError(f"{what} {printable(path)} is a file of the input data {printable(data)}; it would be replaced")
        if not os.access(path, os.W_OK):
            raise OutputError(f"{what} {printable(path)} exists and is not writable")
    _check_creatable(path.parent, what)
    return path


def check_output_folder(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Refuse a folder target that is a file or cannot be made; files in it are checked by name."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {printable(path)} is a file, not a folder")
    _check_creatable(path, what)
    return path


def output_stem(path: str | os.PathLike) -> str:
    """``<stem>-<8 hex digits>`` for one input: the digits hash the absolute path, so two inputs
    with the same file name (``a/001.png``, ``b/001.png``) never share a map, and a re-run names
    the same input's files the same way."""
    absolute = os.fsencode(os.path.abspath(path))
    digest = hashlib.sha256(absolute).hexdigest()[:8]
    stem = os.fsdecode(os.fsencode(Path(path).stem)[:_STEM_BYTES])
    return f"{stem}-{digest}"


@dataclass
class PredictionOutputs:
    """The files one predict run writes; any may be None. ``overwrite`` replaces existing
    targets; ``resume`` keeps an existing CSV's scored rows and skips those inputs."""

    csv: Path | None = None
    maps: Path | None = None
    overlays: Path | None = None
    report: Path | None = None
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        for name in ("csv", "maps", "overlays", "report"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.resume and self.csv is None:
            raise UsageError("--resume needs --csv: the CSV of the earlier run says which inputs are done")
        if self.resume and self.overwrite:
            raise UsageError("--resume keeps the earlier results and --overwrite replaces them; pass one of them")

    def map_path(self, path: Path) -> Path | None:
        return None if self.maps is None else self.maps / f"{output_stem(path)}.npy"

    def overlay_path(self, path: Path) -> Path | None:
        return None if self.overlays is None else self.overlays / f"{output_stem(path)}.png"

    def check(self, inputs: Sequence[Path]) -> None:
        """Every problem a target could have, before anything is scored or written."""
        files = [(self.csv, "--csv"), (self.report, "--report")]
        for target, flag in files:
            if target is not None:
                # Resuming appends to the earlier CSV, which must be there and ours.
                check_output_file(target, overwrite=self.overwrite or (self.resume and flag == "--csv"), what=flag)
        if self.csv is not None and self.report is not None and same_file(self.csv, self.report):
            raise UsageError("--csv and --report name the same file")
        given = {os.path.abspath(p) for p in inputs}
        for target, flag in files:
            if target is not None and os.path.abspath(target) in given:
                raise UsageError(f"{flag} {printable(target)} is also an input image; it would be overwritten")
        for folder, flag in ((self.maps, "--maps"), (self.overlays, "--overlays")):
            if folder is not None:
                check_output_folder(folder, what=flag)
        if self.overwrite or self.resume:
            # Files named after the inputs are this tool's own output: a re-run may replace them.
            return
        for name, target in (("--maps", self.map_path), ("--overlays", self.overlay_path)):
            taken = [t for t in map(target, inputs) if t is not None and (t.exists() or t.is_symlink())]
            if taken:
                more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
                raise OutputExistsError(f"{name}: {printable(taken[0])}{more} already exist; pass --overwrite to replace "
                                  "them, or --resume (with the earlier --csv) to carry on an interrupted run")

    def prepare(self) -> None:
        """Make the folders; call after :meth:`check`."""
        for folder in (self.maps, self.overlays, self.csv and self.csv.parent, self.report and self.report.parent):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)


def _is_within(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))


class PredictionCsv:
    """One row per image, flushed as soon as it is known.

    Text is written through :func:`printable`, so a file name that is not valid UTF-8 becomes
    ``\\xNN`` escapes instead of an encoding error that would end the file early. When resuming,
    the earlier file's complete scored rows are kept (rewritten first, atomically) and their
    inputs reported by :meth:`done`; failed rows are dropped so those inputs are tried again.
    """

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        kept = _read_finished_rows(self.path) if resume and self.path.exists() else []
        self._done = {os.path.abspath(row["path"]): row for row in kept}
        if resume:
            partial = self.path.with_name(self.path.name + ".partial")
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                _writer(handle).writeheader()
                _writer(handle).writerows(kept)
            os.replace(partial, self.path)
            self._handle = open(self.path, "a", newline="", encoding="utf-8")
        else:
            self._handle = open(self.path, "w", newline="", encoding="utf-8")
            _writer(self._handle).writeheader()
        self._writer = _writer(self._handle)
        self._handle.flush()

    def done(self, path: Path) -> dict | None:
        """The earlier run's row for ``path`` if it was scored (resume), else None."""
        return self._done.get(os.path.abspath(printable(path)))

    def write(self, row: dict) -> None:
        self._writer.writerow({key: printable(str(value)) for key, value in row.items()})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _writer(handle) -> csv.DictWriter:
    return csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore", restval="")


def _read_finished_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--resume: cannot read {printable(path)} as a predictions CSV ({error})") from None
    if text and not text.endswith("\n"):
        # The last row was cut off mid-write (a crash or a full disk): its score may be truncated.
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    if "path" not in reader.fieldnames or "score" not in reader.fieldnames:
        raise UsageError(f"--resume: {printable(path)} is not a defectlens predictions CSV "
                         f"(columns {', '.join(reader.fieldnames)}; expected {', '.join(CSV_COLUMNS)})")
    return [row for row in reader if row.get("score") and not row.get("error") and None not in row]

