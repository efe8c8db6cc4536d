"""Content-addressed file store: every uploaded model / probe file is kept once, under its sha256.

Layout: ``<root>/<sha[:2]>/<sha>``. Writes stream into a temp file in the same directory and are
renamed into place, so a reader never sees half a blob and two writers of the same content agree.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"Expected a sha256 hex digest, but got {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, stream: BinaryIO, max_bytes: int | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
        """Copy ``stream`` into the store; return (sha256, size). Raises ``BlobTooLarge`` past ``max_bytes``."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    data = stream.read(chunk)
                    if not data:
                        break
                    size += len(data)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(max_bytes)
                    digest.update(data)
                    out.write(data)
            sha = digest.hexdigest()
            target = self.path(sha)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o600)  # the service user's alone (the data dir is 0700 too)
            os.replace(tmp, target)
            return sha, size
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data))
