"""Images and maps on disk, named by the SHA-256 of their bytes: identical uploads are stored once
and a name can never point at a different file."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

KEY = re.compile(r"^([0-9a-f]{64})\.(png|jpg|jpeg|bmp|tif|tiff|webp|npy)$")


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, extension: str) -> str:
        """Store ``data`` durably and return its key ``<sha256>.<extension>``."""
        key = f"{hashlib.sha256(data).hexdigest()}.{extension.lower()}"
        path = self.path(key)
        if path.exists():
            return key
        path.parent.mkdir(exist_ok=True)
        # Write, fsync, then rename: the file is on disk before the inspection row that names it
        # commits, and a kill mid-write leaves only a temporary file, never a half blob.
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return key

    def unusable(self) -> str | None:
        """Why blobs cannot be written now (the folder deleted or made read-only under the service), or None."""
        if not self.root.is_dir():
            return f"the image folder {self.root} is gone"
        if not os.access(self.root, os.W_OK):
            return f"the image folder {self.root} is not writable"
        return None

    def path(self, key: str) -> Path:
        """The file of a key; keys are checked so a stored value can never escape the folder."""
        match = KEY.match(key)
        if not match:
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()
