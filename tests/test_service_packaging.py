"""The Docker image installs and starts the service with the same commands CI and ``make run`` use.

Docker cannot build on the CI machines, so this test parses the Dockerfile, the Makefile and
``.ci/run`` and checks that they agree."""

from __future__ import annotations

import json
import re
import shlex
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def makefile() -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    variables: dict[str, str] = {}
    targets: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current:
            targets[current][1].append(line.strip())
            continue
        m = re.match(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(2).strip()
            current = None
            continue
        m = re.match(r"^([\w$().\-/]+)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            current = m.group(1)
            targets[current] = (m.group(2).split(), [])
    return variables, targets


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(5):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    return text


def test_ci_runs_make_test_which_installs_with_make_install():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert "make test" in ci
    _, targets = makefile()
    assert "install" in targets["test"][0]


def _without_mounts(run: str) -> str:
    """A RUN line without its BuildKit ``--mount=...`` options (a pip cache shared between the stages)."""
    return " ".join(word for word in run.split() if not word.startswith("--mount="))


def stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's steps by stage name (``FROM ... AS name``)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instr, rest in dockerfile():
        if instr == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else rest
            out[current] = []
        elif current is not None:
            out[current].append((instr, rest))
    return out


def test_docker_installs_with_the_same_command_as_ci():
    steps = stages()["test"]   # the stage that builds the tests' environment
    runs = [_without_mounts(rest) for instr, rest in steps if instr == "RUN"]
    assert "make install" in runs, runs
    workdir = [rest for instr, rest in steps if instr == "WORKDIR"][-1]
    # the install runs in the copied repository, as CI's does
    copy = [rest for instr, rest in steps if instr == "COPY"]
    assert any(c.split()[-1] == workdir and c.split()[-2] == "." for c in copy)


def test_docker_starts_with_the_makefile_run_command():
    variables, targets = makefile()
    steps = stages()["runtime"]
    workdir = [rest for instr, rest in steps if instr == "WORKDIR"][-1]
    cmd = json.loads([rest for instr, rest in steps if instr == "CMD"][-1])
    recipe = targets["run"][1]
    assert len(recipe) == 1
    venv = variables["VENV"]
    venv = venv if venv.startswith("/") else f"{workdir}/{venv}"
    expected = shlex.split(expand(recipe[0], {**variables, "VENV": venv, "BIN": f"{venv}/bin",
                                               "HOST": "0.0.0.0", "PORT": "8000"}))
    assert cmd == expected
    assert "install" in targets["run"][0]
    port = cmd[cmd.index("--port") + 1]
    assert any(instr == "EXPOSE" and rest.split()[0] == port for instr, rest in steps)


def test_docker_image_shape():
    """Issue 23: a Debian base whose python3 is the tests' minor version, a final stage (the last) with no test
    tools, non-root, with a health check."""
    import sys

    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    codename = {(3, 11): "bookworm", (3, 13): "trixie"}[sys.version_info[:2]]   # Debian's python3 of that version
    assert base.startswith("docker.io/library/debian:") and codename in base, base
    names = list(stages())
    assert names[-1] == "runtime" and "test" in names, names
    steps = stages()["runtime"]
    final = " ".join(rest for instr, rest in steps)
    for tool in ("make install", ".[test]", "pytest", "schemathesis", "playwright"):
        assert tool not in final, tool
    venv_stage = " ".join(rest for instr, rest in stages()["runtime-venv"])
    assert "[mlflow]" in venv_stage and "-c /src/constraints.txt" in venv_stage and "[test]" not in venv_stage
    assert "driver must be >= 580" in text       # torch 2.14 / onnxruntime-gpu 1.31: CUDA 13
    user = [rest for instr, rest in steps if instr == "USER"][-1]
    assert user not in ("root", "0")
    health = [rest for instr, rest in steps if instr == "HEALTHCHECK"][-1]
    assert "/healthz" in health
    env = " ".join(rest for instr, rest in steps if instr == "ENV")
    data_dir = re.search(r"AUDIT_DATA_DIR=(\S+)", env).group(1)
    volumes = json.loads([rest for instr, rest in steps if instr == "VOLUME"][-1])
    assert data_dir in volumes


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".audit-data"):
        assert entry in ignored


def test_openapi_ships_inside_the_package(wheel):
    """The wheel built from this tree carries the contract (``audit_service/openapi.yaml``, a link to the
    root file in the checkout) with the root file's bytes, and the type marker and templates beside it."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        # the root file as it was copied for the build (a long run may see it edited since)
        assert archive.read("audit_service/openapi.yaml") == (wheel.parents[1] / "src" / "openapi.yaml").read_bytes()
    assert {"audit_service/py.typed", "audit_service/engine/report/templates/report.html"} <= names
