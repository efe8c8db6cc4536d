"""The OpenAPI ``Report`` component, generated from the typed report (``engine.schema``).

``python -m audit_service.service.openapi_report --write`` rewrites the text between the two marker comments
in ``openapi.yaml`` (the package's copy and the repository root's): ``Report`` and every schema it refers to.
Nothing outside the markers is touched, so the rest of the file stays hand-written. ``--check`` exits 1 when
a file is out of step with the models (the tests run it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..engine.schema import Report

BEGIN = "    # BEGIN generated: the Report schemas (python -m audit_service.service.openapi_report --write)"
END = "    # END generated: the Report schemas"
#: the component the audit report's model is published under (``Report`` is it or a reference run's card)
AUDIT_REPORT = "AuditReport"
_REF = "#/components/schemas/{model}"


class ReferenceRunResult(BaseModel):
    """The result of a ``reference_run`` job: the run's card (training settings, accuracy, its audit)."""

    model_config = ConfigDict(extra="allow")

    name: str
    group: str
    model: str
    seed: int
    training: dict[str, Any] = Field(description="the training settings and outcome")


def openapi_files() -> list[Path]:
    """The package's ``openapi.yaml`` and, in a checkout, the repository root's (each file once: in a
    checkout one is a link to the other)."""
    package = Path(__file__).resolve().parents[1] / "openapi.yaml"
    root = package.parents[1] / "openapi.yaml"
    files: dict[Path, Path] = {}
    for path in (package, root):
        if path.is_file():
            files.setdefault(path.resolve(), path)
    return list(files.values())


def _clean(node: Any) -> Any:
    """Drop pydantic's ``title`` keywords (noise in a contract read by people) and ``discriminator`` (each
    member's ``name`` constant already tells them apart, and not every OpenAPI validator reads it)."""
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
            other = next(o for o in options if o != {"type": "null"})
            if set(other) == {"type"} and isinstance(other["type"], str):  # {type: [number, "null"]}, as by hand
                node = {"type": [other["type"], "null"], **{k: v for k, v in node.items() if k != "anyOf"}}
        return {k: _clean(v) for k, v in node.items()
                if not (k == "title" and isinstance(v, str)) and k != "discriminator"}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def report_schemas() -> dict[str, Any]:
    """The components: ``Report`` (an audit's report or a reference run's card), ``AuditReport`` and the
    schemas they refer to, in name order."""
    schemas: dict[str, Any] = {}
    for model, name in ((Report, AUDIT_REPORT), (ReferenceRunResult, "ReferenceRunResult")):
        schema = model.model_json_schema(ref_template=_REF, mode="serialization")
        for sub, definition in schema.pop("$defs", {}).items():
            if sub in schemas and schemas[sub] != definition:
                raise ValueError(f"Two report models are both called {sub!r}: rename one in engine/schema/")
            schemas[sub] = definition
        schemas[name] = schema
    schemas = {k: _clean(schemas[k]) for k in sorted(schemas)}
    report = {"description": "The engine's report (audit jobs: AuditReport) or the training result (reference "
                             "runs: ReferenceRunResult)",
              "anyOf": [{"$ref": _REF.format(model=AUDIT_REPORT)}, {"$ref": _REF.format(model="ReferenceRunResult")}]}
    return {"Report": report, **schemas}


class _Flow(dict):
    """A small schema written on one line, as the hand-written part of the file does."""


class _FlowList(list):
    """A list of scalars (``required``, ``enum``) written on one line."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _flowed(node: Any) -> Any:
    """Mappings of scalars (and lists of scalars) go on one line; larger ones stay in block style."""
    if isinstance(node, dict):
        inner = {k: _flowed(v) for k, v in node.items()}
        simple = all(not isinstance(v, (dict, list)) or (isinstance(v, (list, _Flow)) and
                                                        all(not isinstance(x, (dict, list)) for x in v))
                     for v in inner.values())
        short = len(repr(node)) <= 100
        return _Flow(inner) if simple and short else inner
    if isinstance(node, list):
        if all(not isinstance(v, (dict, list)) for v in node):
            return _FlowList(node)
        return [_flowed(v) for v in node]
    return node


def generated_block() -> str:
    """The YAML between the markers (indented under ``components.schemas``)."""
    body = yaml.dump({k: _flowed(v) for k, v in report_schemas().items()}, Dumper=_Dumper, sort_keys=False,
                     width=116, allow_unicode=True, default_flow_style=False)
    lines = [("    " + line) if line else line for line in body.splitlines()]
    return "\n".join([BEGIN, *lines, END])


def with_block(text: str, block: str, path: Path | str = "openapi.yaml") -> str:
    """``text`` with the part between the markers (markers included) replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"Expected the marker lines {BEGIN.strip()!r} ... {END.strip()!r} under "
                         f"components.schemas in {path}, but they are missing")
    return text[:start] + block + text[end + len(END):]


def out_of_step(paths: list[Path] | None = None) -> list[Path]:
    """The files whose generated block differs from the models."""
    block = generated_block()
    return [p for p in (paths or openapi_files()) if with_block(p.read_text(), block, p) != p.read_text()]


def write(paths: list[Path] | None = None) -> list[Path]:
    """Rewrite the generated block of each file; returns the files that changed."""
    block = generated_block()
    changed = []
    for path in paths or openapi_files():
        text = path.read_text()
        new = with_block(text, block, path)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audit_service.service.openapi_report", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the generated block")
    action.add_argument("--check", action="store_true", help="exit 1 when a file is out of step with the models")
    args = parser.parse_args(argv)
    if args.write:
        for path in write():
            print(f"wrote {path}")
        return 0
    stale = out_of_step()
    for path in stale:
        print(f"{path}: the Report schemas are out of step with engine/schema/; run "
              "python -m audit_service.service.openapi_report --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
