"""``POST /audit`` with ``model_uri``: the model comes from an operator-allowed MLflow registry instead of an upload.

The client names a registry of ``AUDIT_MLFLOW_ALLOWED_URIS`` (``mlflow_registry``, default the first), never a
URL; the model must be served by that registry itself (``mlflow-artifacts``), so the service reaches no other
host. The file, and the files beside it that may be its ONNX external data, stream into the upload staging area
under ``AUDIT_MAX_MODEL_MB`` together and then follow the exact path of an uploaded model with ``model_data``
parts (content checks, sandboxed model check, adoption), except that data files the graph does not name are
dropped rather than refused. With ``mlflow_write_back=true``
the job carries the request and the worker writes the verdict back (``jobs.write_back``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.errors import AuditError
from ..jobs.blobs import BlobTooLarge
from ..jobs.submission import DATA_PREFIX
from ..jobs.write_back import WriteBackConfigError, WriteBackPolicy, write_back_target
from ..adapters.mlflow_registry import Located, Registry, RegistryNotAllowed, data_path, parse_allowed, parse_model_uri
from .errors import ApiError, BadRequest, Forbidden, PayloadTooLarge, Unprocessable
from .uploads import DATA_FORMAT

REGISTRY_FIELDS = ("model_uri", "mlflow_registry", "mlflow_write_back")
MiB = 1024 * 1024


def pop_registry_fields(form: dict) -> dict[str, Any]:
    """Take ``model_uri``, ``mlflow_registry`` and ``mlflow_write_back`` out of the form fields."""
    fields = {k: form.pop(k) for k in REGISTRY_FIELDS if k in form}
    flag = str(fields.get("mlflow_write_back", "false")).strip().lower()
    if flag not in ("true", "false", "1", "0", "yes", "no", ""):
        raise Unprocessable(f"Expected `mlflow_write_back` to be true or false, but got {flag[:40]!r}",
                            field="mlflow_write_back")
    fields["mlflow_write_back"] = flag in ("true", "1", "yes")
    if not fields.get("model_uri"):
        for name in ("mlflow_registry", "mlflow_write_back"):
            if fields.get(name):
                raise Unprocessable(f"Expected `{name}` only with a `model_uri`, but got no model_uri", field=name)
    return fields


def check_write_back(settings: Any, tenant: str, fields: dict[str, Any]) -> None:
    """403 unless the operator's rules let ``tenant`` write back to the model ``model_uri`` names in the chosen
    registry (``AUDIT_WRITE_BACK_RULES``); checked before anything is fetched."""
    if not fields.get("mlflow_write_back"):
        return
    allowed = parse_allowed(settings.mlflow_allowed_uris)
    registry = str(fields.get("mlflow_registry") or next(iter(allowed), ""))
    target = write_back_target(str(fields.get("model_uri") or "").strip())
    try:
        policy = WriteBackPolicy.from_settings(settings)
    except WriteBackConfigError as exc:
        raise Forbidden(f"Expected no `mlflow_write_back`: the operator's write-back rules are broken ({exc})",
                        field="mlflow_write_back") from None
    if not policy.permits(tenant, registry, target):
        raise Forbidden(f"Expected `mlflow_write_back` only for models this tenant may tag, but the operator's rules "
                        f"(AUDIT_WRITE_BACK_RULES) do not let tenant {tenant!r} write back to {target[:120]!r} in "
                        f"registry {registry[:80]!r}; audit without mlflow_write_back, or ask the operator",
                        field="mlflow_write_back")


def _api_error(exc: AuditError) -> ApiError:
    if getattr(exc, "too_large", False):
        return PayloadTooLarge(exc.message, field="model_uri")
    if isinstance(exc, RegistryNotAllowed):
        return Forbidden(exc.message, field="mlflow_registry")
    return Unprocessable(exc.message, field="model_uri")


def stage_registry_model(st: Any, fields: dict[str, Any], has_upload: bool, staged: dict[str, Path]
                         ) -> tuple[dict, Located, str, dict[str, dict]]:
    """Resolve ``model_uri`` in the allowed registry and stream its model file, and the files beside it that
    may be its ONNX external data (``Located.data``), into the upload staging (``BlobStore.stage``), all
    together under the model cap, checked while streaming; the staging files are added to ``staged`` as they
    are written (the caller deletes them when the submission fails, and drops the data files the model's
    graph does not name once the sandboxed check has said which it names). (model entry, located, the
    registry's allow-list name, {``model_data/NAME``: entry})."""
    if has_upload:
        raise BadRequest("Expected either a `model` file or a `model_uri`, but got both", field="model_uri")
    allowed = parse_allowed(st.settings.mlflow_allowed_uris)
    if not allowed:
        raise Forbidden("Expected a `model` upload: this service fetches from no MLflow registry "
                        "(the operator's AUDIT_MLFLOW_ALLOWED_URIS is empty)", field="model_uri")
    name = str(fields.get("mlflow_registry") or next(iter(allowed)))
    if name not in allowed:
        raise Forbidden(f"Expected `mlflow_registry` to name an allowed registry ({', '.join(allowed)}), but got "
                        f"{name[:80]!r}; the operator's AUDIT_MLFLOW_ALLOWED_URIS lists them", field="mlflow_registry")
    cap = st.settings.max_model_mb * MiB
    located: Located | None = None
    data: dict[str, dict] = {}
    current = None
    try:
        ref = parse_model_uri(str(fields["model_uri"]))
        registry = Registry(allowed[name], proxied_only=True)
        located = registry.locate(ref)
        if located.size is not None and located.size > cap:
            raise _too_large(located, st.settings.max_model_mb)
        with registry._errors(ref), registry.open(located.directory, located.file) as stream:
            staged["model"], sha, size = st.blobs.stage(stream, max_bytes=cap)
        room = cap - size
        if Path(located.file).suffix.lower() == ".onnx":
            for current, listed in located.data.items():
                if listed is not None and listed > room:
                    raise _too_large(located, st.settings.max_model_mb, current)
                key = DATA_PREFIX + current
                beside = data_path(located.file, current)
                with registry._errors(ref), registry.open(located.directory, beside) as stream:
                    staged[key], part_sha, part_size = st.blobs.stage(stream, max_bytes=room)
                room -= part_size
                data[key] = {"sha256": part_sha, "size_bytes": part_size, "filename": current, "format": DATA_FORMAT}
    except BlobTooLarge:
        raise _too_large(located, st.settings.max_model_mb, current) from None
    except AuditError as exc:
        raise _api_error(exc) from None
    if size == 0:
        raise Unprocessable(f"Expected a non-empty model file at {ref.uri}, but got 0 bytes", field="model_uri")
    return {"sha256": sha, "size_bytes": size, "filename": ref.uri[:255]}, located, name, data


def _too_large(located: Located | None, max_mb: int, data: str | None = None) -> PayloadTooLarge:
    file = f"the model file {located.file} of {located.ref.uri}" if located is not None else "the model file"
    if data is None:
        return PayloadTooLarge(f"Expected {file} to be at most {max_mb} MiB, but it is larger (AUDIT_MAX_MODEL_MB)",
                               field="model_uri")
    return PayloadTooLarge(f"Expected {file} and its external data to total at most {max_mb} MiB, but {data!r} takes "
                           f"them past it (AUDIT_MAX_MODEL_MB)", field="model_uri")
