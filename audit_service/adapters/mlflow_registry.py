"""MLflow model registry: fetch a registered model's ONNX (or ``.pt2``) for an audit, write the verdict back.

``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/PATH`` are resolved against a tracking
server (``MLFLOW_TRACKING_URI``, as MLflow's own tools do, or the one the caller names). Only the ``MLmodel``
YAML is read (``yaml.safe_load``) and artifacts are downloaded as bytes: nothing is ever unpickled, and flavors
that load through pickle (``pytorch``'s ``torch.save`` files, pyfunc python models, sklearn, ...) are refused
with a message naming the flavor to log instead. Part of the library core: never imports the service.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

from ..engine.errors import AuditError, ModelError
from ..engine.names import DISPLAY_ORDER
from ..engine.schema import Report, parse_report

#: model files the audit runs; ``.onnx`` first when a directory holds both
MODEL_SUFFIXES = (".onnx", ".pt2")
#: the experiment that holds one run per write-back of a registered model version
AUDIT_EXPERIMENT = "invariance-audits"
#: metrics of the clean condition written back as tags (and run metrics)
HEADLINE_METRICS = tuple(str(m) for m in DISPLAY_ORDER)
TAG_PREFIX = "invariance."
MLMODEL_MAX_BYTES = 1 << 20
_MAX_LISTED = 500   # artifact entries looked at while searching a model directory
_MAX_DEPTH = 3
_HINT = ("log an ONNX export instead: mlflow.onnx.log_model(onnx.load('model.onnx'), name='model'), or log the "
         ".onnx / .pt2 file with the model (mlflow.log_artifact('model.onnx', 'model'))")
#: what MLflow writes beside a flavor's model file: never an ONNX model's external data
MLFLOW_FILES = frozenset({"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
                          "serving_input_example.json", "registered_model_meta", "metadata.json"})
#: the names a fetched model file takes (``fetch``), which no data file may take
MODEL_NAMES = frozenset({"model", "model.onnx", "model.pt", "model.pt2"})


class RegistryError(AuditError):
    """The registry, the URI or what it names cannot be used for an audit (CLI exit 2, HTTP 422; 413 where
    ``too_large``)."""

    too_large: bool = False


class RegistryNotAllowed(AuditError):
    """The service was asked for a registry the operator did not allow (HTTP 403)."""


def is_registry_uri(text: str) -> bool:
    return str(text).startswith(("models:/", "runs:/"))


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/`` or ``runs:/`` URI."""

    uri: str
    kind: str                    # "models" or "runs"
    name: str | None = None      # models: registered model name
    version: str | None = None   # models: version number, or None with an alias
    alias: str | None = None
    run_id: str | None = None    # runs:
    path: str = ""               # runs: artifact path inside the run


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$")


def parse_model_uri(uri: str) -> ModelRef:
    """``models:/NAME/VERSION`` | ``models:/NAME@ALIAS`` | ``runs:/RUN_ID/PATH`` -> ``ModelRef``."""
    uri = str(uri).strip()
    bad = (f"Expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH, but got {uri[:200]!r}")
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):].strip("/")
        if "@" in rest and "/" not in rest.split("@", 1)[1]:
            name, alias = rest.rsplit("@", 1)
            if _SAFE.match(name) and re.fullmatch(r"[A-Za-z0-9_\-]{1,255}", alias):
                return ModelRef(uri, "models", name=name, alias=alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            if _SAFE.match(name) and version.isdigit():
                return ModelRef(uri, "models", name=name, version=version)
        raise RegistryError(bad, field="model_uri")
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        parts = [p for p in path.split("/") if p]
        if re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", run_id) and not any(p in (".", "..") for p in parts):
            return ModelRef(uri, "runs", run_id=run_id, path="/".join(parts))
        raise RegistryError(bad, field="model_uri")
    raise RegistryError(bad, field="model_uri")


@dataclass
class Located:
    """Where a ref's model file lives: ``directory`` (an artifact URI) + ``file`` (relative to it)."""

    ref: ModelRef
    directory: str
    file: str
    flavor: str                   # "onnx" (the flavor's file) or "artifact" (a .onnx / .pt2 logged with it)
    size: int | None = None
    version: str | None = None    # models: the resolved version (an alias names one)
    run_id: str | None = None
    flavors: list[str] = field(default_factory=list)
    #: the files beside ``file`` that may be its ONNX external data {name: size}: plain names in the same
    #: folder, neither MLflow's own files nor other models (the graph decides which it names)
    data: dict[str, int | None] = field(default_factory=dict)


def _mlflow() -> Any:
    # MLflow's usage telemetry would contact a host outside the registry (the service must reach none):
    # off unless the operator turned it on explicitly
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise RegistryError("Expected MLflow to be installed for models:/ and runs:/ URIs, but it is not: "
                            "pip install 'audit-service[mlflow]'", field="model_uri") from None
    return MlflowClient


class Registry:
    """One tracking server. ``proxied_only``: the model must be downloaded through that server (its
    ``mlflow-artifacts`` proxy, or http(s) on the same host), never from another location the registry
    names (the service's rule: it fetches only from registries its operator allowed)."""

    def __init__(self, tracking_uri: str | None = None, *, proxied_only: bool = False) -> None:
        if proxied_only:  # in a web request: fail in seconds, not after MLflow's minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        client_cls = _mlflow()
        import mlflow

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.proxied_only = proxied_only
        self.client = client_cls(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # -- resolving -------------------------------------------------------------------------------------------
    def locate(self, ref: ModelRef) -> Located:
        """Find the model file a ref names, and the files beside it (``Located.data``), reading only listings
        and ``MLmodel``."""
        version = run_id = None
        with self._errors(ref):
            if ref.kind == "models":
                mv = (self.client.get_model_version_by_alias(ref.name, ref.alias) if ref.alias
                      else self.client.get_model_version(ref.name, ref.version))
                version, run_id = str(mv.version), mv.run_id or None
                root = self.client.get_model_version_download_uri(ref.name, version)
            else:
                run_id = ref.run_id
                base = self.client.get_run(ref.run_id).info.artifact_uri.rstrip("/")
                root = f"{base}/{ref.path}" if ref.path else base
        with self._errors(ref):
            root = self._underlying(root)
        self._check_location(root)
        with self._errors(ref):
            located = self._find_model(ref, root)
        located.version, located.run_id = version, run_id
        return located

    def _underlying(self, uri: str) -> str:
        """The storage location behind a version source of the form ``runs:/RUN/PATH`` or ``models:/m-ID``
        (an MLflow 3 logged model), resolved through this tracking server."""
        for _ in range(4):
            if uri.startswith("runs:/"):
                run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
                base = self.client.get_run(run_id).info.artifact_uri.rstrip("/")
                uri = f"{base}/{path}" if path else base
            elif uri.startswith("models:/m-"):
                model_id, _, path = uri[len("models:/"):].strip("/").partition("/")
                base = self.client.get_logged_model(model_id).artifact_location.rstrip("/")
                uri = f"{base}/{path}" if path else base
            else:
                return uri
        raise RegistryError(f"Expected a model version source that resolves to storage, but got {uri[:200]}",
                            field="model_uri")

    def _find_model(self, ref: ModelRef, root: str) -> Located:
        if root.lower().endswith(MODEL_SUFFIXES):  # the version / path is the file itself
            parent, name = root.rsplit("/", 1)
            sizes = {f.path: f.file_size for f in self._repo(parent).list_artifacts() if not f.is_dir}
            if name in sizes:
                return Located(ref, parent, name, "artifact", sizes[name], data=_data_candidates(name, sizes))
        files = self._walk(root)
        located = self._find_model_file(ref, root, files)
        folder = posixpath.dirname(located.file)
        located.data = _data_candidates(located.file, {posixpath.basename(p): size for p, size in files.items()
                                                       if posixpath.dirname(p) == folder})
        return located

    def _find_model_file(self, ref: ModelRef, root: str, files: dict[str, int | None]) -> Located:
        if not files:
            raise RegistryError(f"Expected a model under {ref.uri}, but its artifact location {root} holds no "
                                "files", field="model_uri")
        flavors: dict = {}
        if "MLmodel" in files:
            flavors = self._read_mlmodel(root)
        if "onnx" in flavors:
            data = str((flavors.get("onnx") or {}).get("data") or "model.onnx")
            parts = [p for p in data.split("/") if p]
            if data.startswith("/") or any(p in (".", "..") for p in parts):
                raise RegistryError(f"Expected the onnx flavor's `data` to be a relative path, but got {data!r}",
                                    field="model_uri")
            data = "/".join(parts)
            if data in files:
                return Located(ref, root, data, "onnx", files[data], flavors=sorted(flavors))
        candidates = sorted((p for p in files if p.lower().endswith(MODEL_SUFFIXES)),
                            key=lambda p: (not p.lower().endswith(".onnx"), p.count("/"), p))
        if candidates:
            return Located(ref, root, candidates[0], "artifact", files[candidates[0]], flavors=sorted(flavors))
        named = [f for f in flavors if f != "python_function"] or list(flavors)
        if named:
            loader = (flavors.get("python_function") or {}).get("loader_module")
            how = f"the {named[0]!r} flavor" + (f" (pyfunc loader {loader})" if loader else "")
            raise ModelError(f"Expected an ONNX model, but {ref.uri} is logged with {how}, which loads through "
                             f"pickle and is never loaded here; {_HINT}", field="model_uri")
        shown = ", ".join(sorted(files)[:8])
        raise RegistryError(f"Expected an ONNX (.onnx) or torch.export (.pt2) file under {ref.uri}, but found "
                            f"{shown}; {_HINT}", field="model_uri")

    def _walk(self, root: str) -> dict[str, int | None]:
        """{relative path: size} of the files under ``root`` (bounded depth and count)."""
        repo = self._repo(root)
        out: dict[str, int | None] = {}
        pending: list[tuple[str | None, int]] = [(None, 0)]
        seen = 0
        while pending and seen < _MAX_LISTED:
            path, depth = pending.pop(0)
            for info in repo.list_artifacts(path):
                seen += 1
                if info.is_dir:
                    if depth + 1 < _MAX_DEPTH:
                        pending.append((info.path, depth + 1))
                else:
                    out[info.path] = info.file_size
        return out

    def _read_mlmodel(self, root: str) -> dict:
        import yaml

        buf = bytearray()
        with self.open(root, "MLmodel") as stream:
            while chunk := stream.read(1 << 16):
                buf += chunk
                if len(buf) > MLMODEL_MAX_BYTES:
                    raise RegistryError("Expected an MLmodel file of at most 1 MiB, but it is larger",
                                        field="model_uri")
        text = bytes(buf).decode("utf-8", errors="replace")
        depth = _flow_depth(text)
        if depth > MLMODEL_MAX_DEPTH:
            raise RegistryError(f"Expected an MLmodel file nested at most {MLMODEL_MAX_DEPTH} levels deep, but it "
                                f"nests {depth}", field="model_uri")
        try:
            meta = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RegistryError(f"Expected a YAML MLmodel file, but it does not parse: {str(exc)[:200]}",
                                field="model_uri") from None
        except RecursionError:  # block-style nesting the bracket scan does not see
            raise RegistryError("Expected an MLmodel file of ordinary depth, but it nests too deeply to parse",
                                field="model_uri") from None
        flavors = meta.get("flavors") if isinstance(meta, dict) else None
        return flavors if isinstance(flavors, dict) else {}

    # -- downloading -----------------------------------------------------------------------------------------
    def _repo(self, uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(uri, tracking_uri=self.tracking_uri)

    def _check_location(self, uri: str) -> None:
        if not self.proxied_only:
            return
        loc, track = urlparse(uri), urlparse(self.tracking_uri)
        if loc.scheme == "mlflow-artifacts" and loc.netloc in ("", track.netloc) and track.scheme in ("http", "https"):
            return
        if loc.scheme in ("http", "https") and (loc.scheme, loc.netloc) == (track.scheme, track.netloc):
            return
        raise RegistryError(f"Expected the model's artifacts to be served by the registry itself "
                            f"(mlflow-artifacts:/, mlflow server --serve-artifacts), but they are at "
                            f"{loc.scheme or 'a local path'}:... which this service does not fetch from",
                            field="model_uri")

    @contextlib.contextmanager
    def open(self, directory: str, file: str) -> Iterator[IO[bytes]]:
        """A binary stream of one artifact: streamed through the server for http(s) / mlflow-artifacts
        locations, else (local CLI use only) downloaded by MLflow into a temp dir first."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        repo = self._repo(directory)
        if isinstance(repo, HttpArtifactRepository):
            from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

            resp = http_request(repo._host_creds, posixpath.join("/", file), "GET", stream=True, timeout=120)
            try:
                augmented_raise_for_status(resp)
                resp.raw.decode_content = True
                yield resp.raw
            finally:
                resp.close()
            return
        if self.proxied_only:  # pragma: no cover - _check_location refused it already
            raise RegistryError("Expected an artifact served by the registry", field="model_uri")
        tmp = tempfile.mkdtemp(prefix="audit-mlflow-")
        try:
            local = repo.download_artifacts(file, dst_path=tmp)
            with open(local, "rb") as fh:
                yield fh
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, located: Located, dest_dir: Path, max_bytes: int | None = None) -> Path:
        """Copy the model file into ``dest_dir`` (keeping its suffix), and beside it, under their own names,
        the external data files its ONNX graph names (which must be among ``located.data``); ``RegistryError``
        when the files together pass ``max_bytes`` (checked while streaming)."""
        if max_bytes is not None and located.size is not None and located.size > max_bytes:
            raise too_large(located, max_bytes)
        out = Path(dest_dir) / ("model" + Path(located.file).suffix.lower())
        size = self._download(located, located.file, out, max_bytes)
        if out.suffix != ".onnx" or not located.data:
            return out
        for name in self._named_data(located, out):
            if max_bytes is not None and (located.data.get(name) or 0) > max_bytes - size:
                raise too_large(located, max_bytes, name)
            size += self._download(located, data_path(located.file, name), Path(dest_dir) / name,
                                   None if max_bytes is None else max_bytes - size, name)
        return out

    def _download(self, located: Located, file: str, out: Path, max_bytes: int | None, data: str | None = None) -> int:
        size = 0
        with self._errors(located.ref), self.open(located.directory, file) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise too_large(located, max_bytes, data)
                dst.write(chunk)
        return size

    def _named_data(self, located: Located, graph: Path) -> list[str]:
        """The external data files the fetched graph names, each beside it in the registry (else a
        ``ModelError`` naming it); the graph is read here only for the names (the runtime checks the rest)."""
        from ..engine.runtime.external_data import external_data_names
        from ..engine.runtime.validation import parse_onnx

        try:
            names = external_data_names(parse_onnx(graph.read_bytes()))
        except ModelError:
            return []  # not a graph we can read: the runtime says why when it loads it
        for name in names:
            if name not in located.data or name in MODEL_NAMES:
                beside = ", ".join(sorted(located.data)[:8]) or "none"
                raise ModelError(f"Expected the external data file {name!r} the graph of {located.ref.uri} names "
                                 f"beside its model file {located.file}, but the registry has no such file there "
                                 f"(beside it: {beside}); log the model with mlflow.onnx.log_model, which saves the "
                                 f"data files with it", field="model_uri")
        return names

    @contextlib.contextmanager
    def _errors(self, ref: ModelRef) -> Iterator[None]:
        """MLflow's and the network's exceptions as one-line ``RegistryError``s."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except AuditError:
            raise
        except MlflowException as exc:
            text = " ".join(str(exc.message if hasattr(exc, "message") else exc).split())[:300]
            raise RegistryError(f"Expected {ref.uri} to exist in the registry at {self.tracking_uri}, but MLflow "
                                f"says: {text}", field="model_uri") from None
        except OSError as exc:
            raise RegistryError(f"Expected to reach the registry at {self.tracking_uri}, but: "
                                f"{' '.join(str(exc).split())[:300]}", field="model_uri") from None

    # -- writing back ----------------------------------------------------------------------------------------
    def write_back(self, located: Located, report: Report | dict, html: str | None = None,
                   overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Tag the model version (``models:/``) or the run (``runs:/``) with the verdict and the clean
        condition's headline metrics; log the JSON and HTML reports as artifacts of a run (a new run in
        ``invariance-audits`` linked to the version by tags, or the named run itself). ``overrides``: tags that
        replace the report's (the service's operator gate, tenant and job). The tags set."""
        report = parse_report(report)
        tags = {**verdict_tags(report, located), **(overrides or {})}
        metrics = {k[len(TAG_PREFIX):]: float(v) for k, v in tags.items()
                   if k[len(TAG_PREFIX):] in HEADLINE_METRICS}
        ref = located.ref
        with self._errors(ref):
            if ref.kind == "models":
                run_id = self._audit_run(located, report)
                tags[TAG_PREFIX + "run_id"] = run_id
                tags[TAG_PREFIX + "report"] = f"runs:/{run_id}/invariance/report.json"
                artifact_dir = "invariance"
            else:
                run_id = ref.run_id
                tags[TAG_PREFIX + "report"] = f"runs:/{run_id}/invariance/report.json"
                artifact_dir = "invariance"
            self._log_reports(run_id, artifact_dir, report, html)
            for key, value in metrics.items():
                if math.isfinite(value):
                    self.client.log_metric(run_id, TAG_PREFIX + key, value)
            for key, value in tags.items():
                if ref.kind == "models":
                    self.client.set_model_version_tag(ref.name, located.version, key, value)
                else:
                    self.client.set_tag(run_id, key, value)
            if ref.kind == "models":
                self.client.set_terminated(run_id)
        return tags

    def _audit_run(self, located: Located, report: Report) -> str:
        ref = located.ref
        exp = self.client.get_experiment_by_name(AUDIT_EXPERIMENT)
        if exp is None:
            from mlflow.exceptions import MlflowException

            try:
                exp_id = self.client.create_experiment(AUDIT_EXPERIMENT)
            except MlflowException:  # created meanwhile by another audit
                exp_id = self.client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id
        else:
            exp_id = exp.experiment_id
        run_tags = {"mlflow.runName": f"invariance audit {ref.name} v{located.version}",
                    "mlflow.source.name": "audit-service", "mlflow.source.type": "JOB",
                    "model_name": ref.name, "model_version": str(located.version),
                    TAG_PREFIX + "model_uri": f"models:/{ref.name}/{located.version}",
                    TAG_PREFIX + "model_file": located.file}
        if located.run_id:
            run_tags["model_source_run_id"] = located.run_id
        run = self.client.create_run(exp_id, tags=run_tags)
        if report.group.name:
            self.client.log_param(run.info.run_id, "group", report.group.name[:250])
        return run.info.run_id

    def _log_reports(self, run_id: str, artifact_dir: str, report: Report, html: str | None) -> None:
        with tempfile.TemporaryDirectory(prefix="audit-report-") as tmp:
            (Path(tmp) / "report.json").write_text(json.dumps(report.to_json(), indent=2))
            self.client.log_artifact(run_id, str(Path(tmp) / "report.json"), artifact_dir)
            if html is not None:
                (Path(tmp) / "report.html").write_text(html)
                self.client.log_artifact(run_id, str(Path(tmp) / "report.html"), artifact_dir)


def _data_candidates(model_file: str, siblings: dict[str, int | None]) -> dict[str, int | None]:
    """The files beside ``model_file`` that may be its external data: plain names (``external_names``), not
    MLflow's own files, not the model, not another model file."""
    from ..engine.external_names import location_problem

    own = posixpath.basename(model_file)
    return {name: size for name, size in sorted(siblings.items())
            if location_problem(name) is None and name != own and name not in MLFLOW_FILES
            and name not in MODEL_NAMES and not name.lower().endswith(MODEL_SUFFIXES)}


def data_path(model_file: str, name: str) -> str:
    """The artifact path of a data file ``name`` beside ``model_file``."""
    folder = posixpath.dirname(model_file)
    return f"{folder}/{name}" if folder else name


def too_large(located: Located, max_bytes: int, data: str | None = None) -> RegistryError:
    cap = f"{max_bytes / (1 << 20):g} MiB" if max_bytes >= 1 << 20 else f"{max_bytes} bytes"
    what = (f"the model file {located.file} of {located.ref.uri} to be at most {cap}" if data is None else
            f"the model file {located.file} of {located.ref.uri} and its external data to total at most {cap}")
    by = "" if data is None else f" with {data!r}"
    err = RegistryError(f"Expected {what}, but it is larger{by} (AUDIT_MAX_MODEL_MB)", field="model_uri")
    err.too_large = True
    return err


def verdict_tags(report: Report | dict, located: Located | None = None) -> dict[str, str]:
    """The tags a promotion rule reads: verdict, passed, borderline (and on which criteria), policy, require,
    require_confident (the strict gate), and the clean condition's metrics (over g != e)."""
    report = parse_report(report)
    verdict = report.verdict
    straddling = [f"{c.condition} {c.criterion}" for c in verdict.borderline_criteria]
    tags = {
        TAG_PREFIX + "verdict": str(verdict.label),
        TAG_PREFIX + "passed": "true" if verdict.passed else "false",
        TAG_PREFIX + "borderline": "true" if verdict.borderline else "false",
        TAG_PREFIX + "policy": f"{verdict.policy.name}@{verdict.policy.version}",
        TAG_PREFIX + "require": ",".join(verdict.require),
        TAG_PREFIX + "require_confident": "true" if verdict.require_confident else "false",
        TAG_PREFIX + "group": str(report.group.name),
    }
    if straddling:
        tags[TAG_PREFIX + "borderline_criteria"] = ", ".join(straddling)[:4000]
    if located is not None:
        tags[TAG_PREFIX + "model_file"] = located.file
    clean = report.headline_condition  # the clean probes' metrics; without probes, the first condition's (noise)
    if clean is not None:
        tags[TAG_PREFIX + "metrics_condition"] = str(clean.name)
        for key in HEADLINE_METRICS:
            value = clean.metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                tags[TAG_PREFIX + key] = f"{value:.6g}"
    return tags


@contextlib.contextmanager
def fetched_model(uri: str, tracking_uri: str | None = None, max_bytes: int | None = None
                  ) -> Iterator[tuple[Path, Located, Registry]]:
    """The CLI's way in: the model file of ``uri`` in a temp dir, removed afterwards."""
    ref = parse_model_uri(uri)
    registry = Registry(tracking_uri)
    located = registry.locate(ref)
    with tempfile.TemporaryDirectory(prefix="audit-mlflow-") as tmp:
        yield registry.fetch(located, Path(tmp), max_bytes), located, registry


def parse_allowed(text: str) -> dict[str, str]:
    """``AUDIT_MLFLOW_ALLOWED_URIS``: comma-separated ``URI`` or ``NAME=URI``; unnamed entries are named
    by their position (``0``, ``1``, ...). The first entry is the default."""
    out: dict[str, str] = {}
    for i, item in enumerate(x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        name, sep, uri = item.partition("=")
        if not sep or "://" in name or ":" in name:
            name, uri = str(i), item
        out[name.strip()] = uri.strip().rstrip("/")
    return out


__all__ = ["AUDIT_EXPERIMENT", "Located", "ModelRef", "Registry", "RegistryError", "RegistryNotAllowed",
           "data_path", "fetched_model", "is_registry_uri", "parse_allowed", "parse_model_uri", "verdict_tags"]


#: an MLmodel file nests a handful of levels; YAML parsers recurse once per level
MLMODEL_MAX_DEPTH = 64


def _flow_depth(text: str) -> int:
    """The deepest nesting of YAML flow collections (``[`` / ``{``) in ``text``, quotes aside: a cheap bound
    checked before the (recursive) parser sees the file."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest
