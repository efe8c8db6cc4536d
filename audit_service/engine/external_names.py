"""The one rule for the names of ONNX external data files, in plain Python (no onnx, no torch), so that the
runtime, the jobs and the web layer check a name the same way and the web layer imports nothing heavy.

A name is accepted only as a plain file name in the model's own folder: not empty, no NUL or control
character, not absolute (``/x``, ``\\x``, ``C:...``), not ``.`` or ``..`` and no ``..`` component, no path
separator (no subfolders), at most 255 bytes in UTF-8.
"""

from __future__ import annotations

import re

MAX_NAME_BYTES = 255


def location_problem(location: str) -> str | None:
    """Why ``location`` is not a plain file name (completing "its location 'x' ..."), or None when it is."""
    if not location:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        return "contains a control character"
    if location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        return "is an absolute path"
    if location in (".", "..") or ".." in re.split(r"[/\\]", location):
        return "climbs out of the model's folder with '..'"
    if "/" in location or "\\" in location:
        return "names a subfolder"
    if len(location.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None
