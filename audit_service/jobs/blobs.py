"""Content-addressed file store: every uploaded model / probe file is kept once, under its sha256.

Layout: ``<root>/<sha[:2]>/<sha>``. An upload first streams into a private file of the staging dir
(``<root>/../uploads``: ``stage``), is checked there, and only an accepted one is renamed into the store
(``adopt``), so a rejected upload leaves nothing behind and a reader never sees half a blob.

Garbage: ``remove_unreferenced`` deletes blobs no job refers to (after a job is deleted, or when a
submission fails after its files were adopted). A submission holds the store's lock *shared* from
``adopt`` until its job row is committed (``pinned``); the collector takes it *exclusive*, so it never
deletes a blob that a job being created is about to refer to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

#: errnos of a full disk or an exhausted quota: the service answers 507 and recovers when space comes back
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: str | Path, staging: str | Path | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(staging) if staging is not None else self.root.parent / "uploads"
        self.lock_path = self.root.parent / "locks" / "blobs.lock"

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"Expected a sha256 hex digest, but got {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # ------------------------------------------------------------------ staging
    def stage(self, stream: BinaryIO, max_bytes: int | None = None, chunk: int = 1 << 20) -> tuple[Path, str, int]:
        """Copy ``stream`` into a private staging file; return (path, sha256, size). The caller adopts it
        (``adopt``) or deletes it. Raises ``BlobTooLarge`` past ``max_bytes`` and ``OSError`` (ENOSPC...)
        when the disk is full; the partial file is removed in both cases."""
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=self.staging)
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
            return Path(tmp), digest.hexdigest(), size
        except BaseException:
            _unlink(Path(tmp))
            raise

    def adopt(self, staged: Path, sha256: str) -> Path:
        """Move a staged file into the store under ``sha256`` (which the caller computed while staging).

        A blob already stored under that hash is kept, never replaced: a running sandbox's Landlock rule
        names that file's inode, and a replaced file would make its model open fail (the staged copy holds
        the same bytes and is dropped)."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o600)  # the service user's alone (the data dir is 0700 too)
        try:
            os.link(staged, target)  # atomic create-if-absent: never replaces an existing blob
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: rename, unless the blob is there already
            if not target.exists():
                os.replace(staged, target)
        _unlink(staged)
        return target

    def put_stream(self, stream: BinaryIO, max_bytes: int | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
        """Copy ``stream`` into the store; return (sha256, size). Raises ``BlobTooLarge`` past ``max_bytes``."""
        staged, sha, size = self.stage(stream, max_bytes, chunk)
        try:
            self.adopt(staged, sha)
        finally:
            _unlink(staged)
        return sha, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data))

    # ------------------------------------------------------------------ garbage
    @contextlib.contextmanager
    def _lock(self, exclusive: bool, timeout: float = 30.0) -> Iterator[None]:
        self.lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the blob store lock is busy") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def pinned(self) -> contextlib.AbstractContextManager[None]:
        """Hold while adopting files and committing the job that refers to them (shared lock)."""
        return self._lock(exclusive=False)

    def remove_unreferenced(self, shas: Iterable[str], referenced: Callable[[str], bool]) -> list[str]:
        """Delete the blobs among ``shas`` for which ``referenced(sha)`` is false (no job refers to them);
        return those deleted. Best effort: a busy lock leaves them for a later call."""
        removed = []
        try:
            with self._lock(exclusive=True, timeout=10.0):
                for sha in dict.fromkeys(shas):
                    if not referenced(sha) and _unlink(self.path(sha)):
                        removed.append(sha)
                        with contextlib.suppress(OSError):
                            self.path(sha).parent.rmdir()  # only when empty
        except TimeoutError:
            pass
        return removed


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def is_disk_full(exc: BaseException) -> bool:
    """An ``OSError`` of a full disk / exhausted quota, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return "database or disk is full" in text or "no space left on device" in text or "quota exceeded" in text
