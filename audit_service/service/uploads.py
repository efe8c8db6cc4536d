"""Uploaded files: stream into the blob store under a per-file cap, then check what they are.

Models are validated with ``runtime.load_model`` before a job is queued (a file that does not load
is a 422 at submission) — inside a sandboxed child process (``jobs.launcher``), never in the web process. Probe files are checked by their ``.npy`` / ``.npz`` headers only — no
array is read and nothing is unpickled here; the sandbox loads them. An ONNX model's external data files
(``model_data`` parts) are staged with it under one cap, by plain file names only, linked beside it in a
folder of its own for the check, and kept only when its graph names them (``save_model_data``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from werkzeug.datastructures import FileStorage

from ..engine.external_names import location_problem
from ..jobs.blobs import BlobStore, BlobTooLarge
from ..jobs.launcher import Limits, launch, task_env
from ..jobs.failures import cap_text
from ..jobs.settings import Settings
from ..jobs.submission import DATA_PREFIX, MODEL_LINKS, data_inputs, link_model_folder
from .errors import PayloadTooLarge, Unprocessable

MiB = 1024 * 1024
_VALIDATED: "OrderedDict[str, dict]" = OrderedDict()
_VALIDATED_LOCK = threading.Lock()


def save_upload(blobs: BlobStore, upload: FileStorage, field: str, max_mb: int) -> tuple[dict, Path]:
    """Stream one upload into a private staging file (``BlobStore.stage``); (entry, staged path). The
    caller adopts the file into the store once the submission is accepted, or deletes it."""
    try:
        staged, sha, size = blobs.stage(upload.stream, max_bytes=max_mb * MiB)
    except BlobTooLarge:
        raise PayloadTooLarge(f"Expected `{field}` to be at most {max_mb} MiB, but the upload is larger "
                              f"(AUDIT_MAX_{'MODEL' if field == 'model' else 'PROBES'}_MB)", field=field) from None
    if size == 0:
        staged.unlink(missing_ok=True)
        raise Unprocessable(f"Expected a non-empty `{field}` file, but got 0 bytes", field=field)
    name = Path(upload.filename or "").name[:255] or None
    return {"sha256": sha, "size_bytes": size, "filename": name}, staged


#: the most external data files one model may come with (onnx writes one per tensor when asked to)
MAX_DATA_FILES = 2048
DATA_FORMAT = "onnx_data"


def data_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a staged external data file's name (completing "... but 'x' ..."), or None."""
    why = location_problem(name)
    if why is not None:
        return f"{why}: only plain file names, as the graph names them, are staged beside the model"
    if name in MODEL_LINKS:
        return "is the name the model itself takes in its staged folder; rename the data file and its location"
    return None


def save_model_data(blobs: BlobStore, uploads: list[FileStorage], room: int, max_mb: int,
                    staged: dict[str, Path]) -> dict[str, dict]:
    """Stream the ``model_data`` parts (an ONNX model's external data files, each part's file name the
    location the graph gives it) into staging files, under ``room`` bytes together (what the model left of
    ``AUDIT_MAX_MODEL_MB``): {input key: entry}, input keys ``model_data/NAME``, their staging files added to
    ``staged`` as they are written (the caller deletes those of a refused submission). A name that is not a
    plain file name, a duplicate, or a sum over the cap is refused before the next part is read."""
    if len(uploads) > MAX_DATA_FILES:
        raise Unprocessable(f"Expected at most {MAX_DATA_FILES} `model_data` parts, but got {len(uploads)}; save "
                            f"the external data in one file (onnx.save_model(..., all_tensors_to_one_file=True))",
                            field="model_data")
    entries: dict[str, dict] = {}
    for upload in uploads:
        name = upload.filename
        if not name:
            raise Unprocessable("Expected each `model_data` part to be a file named by the location the graph gives "
                                "it (e.g. -F model_data=@model.onnx.data), but one has no file name", field="model_data")
        why = data_name_problem(name)
        if why is not None:
            raise Unprocessable(f"Expected each `model_data` file name to be a plain file name, but {name[:300]!r} "
                                f"{why}", field="model_data")
        key = DATA_PREFIX + name
        if key in entries:
            raise Unprocessable(f"Expected each `model_data` file once, but {name!r} comes twice", field="model_data")
        try:
            staged[key], sha, size = blobs.stage(upload.stream, max_bytes=max(0, room))
        except BlobTooLarge:
            raise PayloadTooLarge(f"Expected the model and its `model_data` files to total at most {max_mb} MiB "
                                  f"(AUDIT_MAX_MODEL_MB), but {name!r} takes them past it", field="model_data") from None
        room -= size
        entries[key] = {"sha256": sha, "size_bytes": size, "filename": name, "format": DATA_FORMAT}
    return entries


def check_data_named(data: dict[str, dict], named: list[str]) -> None:
    """422 naming the first staged data file (``model_data/NAME`` entries) the model's graph does not name."""
    extra = sorted(set(data_inputs(data)) - set(named))
    if extra:
        graph = ", ".join(repr(n) for n in named[:8]) or "none"
        raise Unprocessable(f"Expected every `model_data` part to be a file the model's graph names, but "
                            f"{extra[0]!r} is not (the graph names {graph})", field="model_data")


#: the engine the submission-time check runs in the sandbox: load the model, fit probes, labels, group, shifts
PRECHECK_ENGINE = "audit_service.jobs.estimate:precheck_with_estimate"  # + the cost estimate
#: spec fields as the client names them (the engine names them from the spec's root)
_SPEC_FIELDS = ("group", "shifts", "options", "policy", "require")


def validate_model(path: Path, entry: dict, settings: Settings, input_shape: tuple[int, ...] | None = None,
                   spec: dict | None = None, files: dict[str, tuple[Path, str, str]] | None = None,
                   tenant: str = "default", active: int = 0,
                   data: dict[str, tuple[Path, str]] | None = None) -> tuple[dict, list[str]]:
    """Check the model in a sandboxed child (cached); fill ``format``; 422 when it does not load. With
    ``spec`` (and the probe ``files``: {field: (path, format, sha256)}), the child also checks everything the audit
    would check before it sweeps (``audit.precheck_audit``): probes and labels against the model, the group
    against its input shape (axes, sizes, closure and product orders), the shifts; a 422 names the field.
    ``data``: the ONNX model's external data files {location: (path, sha256)}, linked beside the model in
    the child's model folder (``link_model_folder``). Untrusted model code (TorchScript, or our conversion of
    ONNX) never runs in the web process: the child has the audits' memory / CPU limits, no network, and a
    wall-clock timeout. Each check takes one of ``max_model_checks`` global and ``max_tenant_checks``
    per-tenant slots (``check_slot``). (the entry with its format, the data files the graph names)."""
    files, data = files or {}, data or {}
    key = (entry["sha256"], input_shape, json.dumps(spec, sort_keys=True) if spec is not None else None,
           tuple(sorted((k, v[2]) for k, v in files.items())), tuple(sorted((k, v[1]) for k, v in data.items())))
    with _VALIDATED_LOCK:
        info = _VALIDATED.get(key)
    if info is None:
        with check_slot(settings, tenant, active):
            info = _check_in_sandbox(path, settings, input_shape, spec, files, data)
        with _VALIDATED_LOCK:
            _VALIDATED[key] = info
            while len(_VALIDATED) > 256:
                _VALIDATED.popitem(last=False)
    return ({**entry, "format": info["format"], **({"estimate": info["estimate"]} if info.get("estimate") else {})},
            list(info.get("external_data") or []))


@contextlib.contextmanager
def check_slot(settings: Settings, tenant: str, active: int = 0) -> Iterator[None]:
    """One of ``max_tenant_checks`` slots of ``tenant`` (fewer when its queued + running jobs ``active``
    leave less room under ``max_tenant_jobs``: a check counts as a job) and one of ``max_model_checks``
    global slots, as ``flock``s on files of the data dir, so every web worker process shares them; 429
    (tenant) or 503 (global) with Retry-After when none is free."""
    from .errors import ServiceUnavailable, TooManyRequests

    locks = Path(settings.data_dir) / "locks"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    retry = {"Retry-After": str(max(1, min(60, int(settings.validate_timeout_s // 4))))}
    tenant_key = hashlib.sha256(tenant.encode()).hexdigest()[:16]
    room = max(0, min(settings.max_tenant_checks, settings.max_tenant_jobs - active))
    mine = _take_slot(locks, f"check-{tenant_key}", room)
    if mine is None:
        raise TooManyRequests(f"you have {room} model checks running (AUDIT_MAX_TENANT_CHECKS="
                              f"{settings.max_tenant_checks}, and each counts against AUDIT_MAX_TENANT_JOBS="
                              f"{settings.max_tenant_jobs} with your {active} queued or running audits); retry "
                              f"after the Retry-After seconds", headers=retry, slug="tenant-limit")
    try:
        shared = _take_slot(locks, "check", settings.max_model_checks)
        if shared is None:
            raise ServiceUnavailable(f"the service is checking {settings.max_model_checks} models already "
                                     f"(AUDIT_MAX_MODEL_CHECKS); retry after the Retry-After seconds", headers=retry)
        try:
            yield
        finally:
            os.close(shared)
    finally:
        os.close(mine)


def _take_slot(locks: Path, prefix: str, n: int) -> int | None:
    """An fd holding an exclusive flock on one of ``prefix-0..n-1``; None when all are held."""
    for i in range(n):
        fd = os.open(locks / f"{prefix}-{i}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    return None


def _check_limits(workdir: Path, settings: Settings) -> Limits:
    """The submission-time check's sandbox: the audits' memory, CPU of the check timeout, no network."""
    cpu = max(5, int(settings.validate_timeout_s))
    return Limits(memory_mb=settings.job_memory_mb, cpu_s=cpu, netns=settings.sandbox_netns != "off",
                  file_mb=settings.sandbox_file_mb,
                  env={**task_env(workdir, settings),
                       "AUDIT_MAX_MODEL_BYTES": str(settings.max_model_mb * MiB),
                       "AUDIT_SANDBOX_MEMORY_MB": str(settings.job_memory_mb)})


def symmetrize_in_sandbox(path: Path, spec: dict, settings: Settings, target: Path,
                          data: dict[str, Path] | None = None) -> Path:
    """The orbit-averaged model of ``path`` (with its external ``data`` files {location: path}) over ``spec``'s
    group as an ONNX file at ``target`` (moved there whole, never read into memory), built in a sandboxed child
    with the model check's limits (``_check_limits``; Landlock confines it to its workdir). 422 naming the field
    when the model has no torch twin, the group is not exact, or the child fails or runs out of time."""
    def task(workdir: Path, model: Path) -> dict:
        return {"kind": "symmetrize", "model": str(model), "spec": spec, "output": str(workdir / "symmetrized.onnx"),
                "max_bytes": settings.max_model_mb * MiB}

    def collect(result: dict, workdir: Path) -> Path | None:
        output = workdir / "symmetrized.onnx"
        if not output.is_file():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(output, target)  # same file system (the data dir): atomic, and the workdir goes after
        return target

    return _run_short_task(path, settings, task, collect, expected="a model that can be symmetrized",
                           child="the sandboxed child", explain=False, data=data,
                           slow=f"Expected a model that can be symmetrized within {settings.validate_timeout_s:g} s, "
                                f"but it did not finish in time and was stopped")


def _check_in_sandbox(path: Path, settings: Settings, input_shape: tuple[int, ...] | None,
                      spec: dict | None = None, files: dict[str, tuple[Path, str, str]] | None = None,
                      data: dict[str, tuple[Path, str]] | None = None) -> dict:
    def task(workdir: Path, model: Path) -> dict:
        if spec is None:
            return {"kind": "validate", "model": str(model), "max_bytes": settings.max_model_mb * MiB,
                    "input_shape": list(input_shape) if input_shape else None}
        out = {"kind": "audit", "engine": PRECHECK_ENGINE, "spec": spec, "model": str(model)}
        for name, (file_path, fmt, _sha) in (files or {}).items():
            link = workdir / f"{name}.{fmt}"
            os.symlink(file_path.resolve(), link)
            out[name] = str(link)
        return out

    def collect(result: dict, _workdir: Path) -> dict:
        return {**result["report"], "external_data": result.get("external_data")}

    return _run_short_task(path, settings, task, collect,
                           expected="a loadable ONNX or TorchScript classifier", child="the sandboxed model check",
                           explain=True, data={name: p for name, (p, _sha) in (data or {}).items()},
                           slow=f"Expected a model that loads and runs one zero batch within "
                                f"{settings.validate_timeout_s:g} s, but checking it did not finish in time "
                                f"and was stopped")


def _run_short_task(path: Path, settings: Settings, make_task: Callable[[Path, Path], dict],
                    collect: Callable[[dict, Path], Any], expected: str, child: str, explain: bool, slow: str,
                    data: dict[str, Path] | None = None) -> Any:
    """One short sandboxed task on an uploaded model (the submission check, the symmetrized download):
    a private workdir with the model linked into a folder of its own (with its external ``data`` files
    beside it), the check's limits and wall clock, the child's error as a 422 naming the field (``explain``:
    model errors say what was expected), the workdir removed after."""
    workdir = Path(settings.data_dir).resolve() / "validate" / uuid.uuid4().hex
    (workdir / "tmp").mkdir(parents=True)
    try:
        model, links = link_model_folder(workdir / "model", path, "model.onnx" if data else "model", data or {})
        task = make_task(workdir, model)
        if links:
            task["model_data"] = [str(p) for p in links]
        (workdir / "task.json").write_text(json.dumps(task))
        handle = launch(workdir, _check_limits(workdir, settings), warm=bool(settings.warm_sandbox))
        try:
            handle.wait(settings.validate_timeout_s)
            timed_out = False
        except TimeoutError:
            timed_out = True
        rc = handle.end()  # the check's slot is released only once its whole process group is gone
        if timed_out:
            raise Unprocessable(slow, field="model")
        try:
            result = json.loads((workdir / "result.json").read_text())
        except (OSError, ValueError):
            result = None
        if isinstance(result, dict) and result.get("ok"):
            value = collect(result, workdir)
            if value is not None:
                return value
        if isinstance(result, dict) and isinstance(result.get("error"), dict):
            err = result["error"]
            field = str(err.get("field") or "model")[:128]
            if field.split(".")[0].split("[")[0] in _SPEC_FIELDS:
                field = f"spec.{field}"
            default = "the model could not be loaded" if explain else "the model could not be symmetrized"
            message = cap_text(str(err.get("message") or default))
            if explain and field == "model" and err.get("type") in ("audit_failed", "out_of_memory",
                                                                    "not_implemented"):
                message = f"loading failed: {message}"
            if explain and field == "model" and not message.startswith("Expected"):
                message = f"Expected {expected}, but {message}"
            raise Unprocessable(message, field=field)
        what = (f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}")
        raise Unprocessable(f"Expected {expected}, but {child} {what} without a result (memory limit "
                            f"{settings.job_memory_mb} MiB)", field="model")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


#: an .npz may declare at most this many times the probe cap in uncompressed bytes (zip bombs)
NPZ_EXPANSION = 4
MAX_NPZ_MEMBERS = 16
MAX_ARRAY_RANK = 8


def array_kind(path: Path, field: str, max_bytes: int | None = None) -> tuple[str, tuple[int, ...] | None]:
    """(``npy`` | ``npz``, shape of the probe array) from the file's headers; 422 when neither parses, when
    a header declares more data than the file holds (truncated, or a tiny file claiming a huge array), or
    when an .npz would expand past ``NPZ_EXPANSION`` x the cap (zip bomb). Nothing is decompressed."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        with open(path, "rb") as fh:
            shape, nbytes = _read_npy_header(fh, field)
            available = size - fh.tell()
        if nbytes > available:
            raise Unprocessable(f"Expected `{field}` to hold the {nbytes} bytes its header declares for shape "
                                f"{list(shape)}, but the file has {available}: it is truncated or lies", field=field)
        return "npy", shape
    if head[:2] == b"PK":
        shapes: dict[str, tuple[int, ...]] = {}
        cap = (max_bytes or 256 * MiB) * NPZ_EXPANSION
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.infolist() if m.filename.endswith(".npy")]
                if not members:
                    raise Unprocessable(f"Expected `{field}` .npz to hold .npy arrays, but it holds none", field=field)
                if len(zf.infolist()) > MAX_NPZ_MEMBERS:
                    raise Unprocessable(f"Expected `{field}` .npz to hold at most {MAX_NPZ_MEMBERS} arrays, but it "
                                        f"holds {len(zf.infolist())}", field=field)
                declared = sum(m.file_size for m in zf.infolist())
                if declared > cap:
                    raise Unprocessable(f"Expected `{field}` .npz to expand to at most {cap} bytes "
                                        f"({NPZ_EXPANSION} x AUDIT_MAX_PROBES_MB), but its members declare "
                                        f"{declared} (a zip bomb?)", field=field)
                for m in members:
                    with zf.open(m) as fh:
                        shape, nbytes = _read_npy_header(fh, field)
                    if nbytes > m.file_size:
                        raise Unprocessable(f"Expected `{field}` member {m.filename!r} to hold the {nbytes} bytes "
                                            f"its header declares, but it has {m.file_size}", field=field)
                    shapes[m.filename[:-4]] = shape
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
            raise Unprocessable(f"Expected `{field}` to be a .npz archive, but {exc}", field=field) from None
        key = next((k for k in ("x", "probes", "X") if k in shapes), None)
        return "npz", shapes.get(key) if key else None
    raise Unprocessable(f"Expected `{field}` to be a NumPy .npy or .npz file, but its first bytes are {head!r}",
                        field=field)


def _read_npy_header(fh: Any, field: str) -> tuple[tuple[int, ...], int]:
    """(shape, declared data bytes) of one .npy header; refuses object arrays and absurd shapes."""
    try:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(fh, max_header_size=100_000)
    except Exception as exc:  # noqa: BLE001
        raise Unprocessable(f"Expected `{field}` to hold valid .npy arrays, but the header does not parse: {exc}",
                            field=field) from None
    if dtype.hasobject:
        raise Unprocessable(f"Expected `{field}` to hold numeric arrays, but it holds Python objects "
                            f"(which the service never unpickles)", field=field)
    if len(shape) > MAX_ARRAY_RANK:
        raise Unprocessable(f"Expected `{field}` arrays of rank at most {MAX_ARRAY_RANK}, but got shape "
                            f"{list(shape)}", field=field)
    dims = tuple(int(d) for d in shape)
    return dims, math.prod(dims) * int(dtype.itemsize)
