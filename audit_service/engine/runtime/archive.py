"""Bounds on zip archives (TorchScript and ``.pt2``) before any member is decompressed.

Why: a model file is capped in bytes, but a zip's members can declare far more once inflated (a 1 MiB
``.pt2`` zip bomb cost 30 s of sandbox CPU at submission). The central directory declares each member's
inflated size and ``zipfile`` never inflates past it, so checking the declarations bounds the work.
"""

from __future__ import annotations

import io
import zipfile

from ..errors import ModelError

#: members one model archive may hold (a ResNet-50 program has about 330)
MAX_MEMBERS = 10_000
#: inflated bytes per stored byte that an archive may declare in all (weights are stored, not deflated)
MAX_EXPANSION = 4


def check_zip_bounds(data: bytes, what: str) -> None:
    """``ModelError`` when the archive in ``data`` declares more than ``MAX_MEMBERS`` members or inflates past
    ``MAX_EXPANSION`` x its own size (at least 1 MiB of room for tiny models)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelError(f"Expected {what}, but the zip is damaged: {exc}", field="model") from None
    if len(infos) > MAX_MEMBERS:
        raise ModelError(
            f"Expected {what} of at most {MAX_MEMBERS} archive members, but it has {len(infos)}", field="model"
        )
    declared = sum(info.file_size for info in infos)
    limit = max(MAX_EXPANSION * len(data), 1 << 20)
    if declared > limit:
        raise ModelError(
            f"Expected {what} whose members inflate to at most {MAX_EXPANSION} x the file's size "
            f"({limit} bytes), but they declare {declared} bytes (a zip bomb?); save the model "
            f"with torch.jit.save / torch.export.save",
            field="model",
        )
