"""Launch N sandboxed model checks through the warm fork server, one after another, and count exit codes.

Written for the loader crash seen once in the suite (a child dying at start with status 127, "Inconsistency
detected by ld.so ... r_state == RT_CONSISTENT"): every child should exit 0. Run it beside a CPU hog to add
load. Each child is the submission-time check of a small TorchScript CNN (``audit`` task, precheck engine).

    .venv/bin/python benchmarks/stress_sandbox.py [N]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from audit_service.jobs.launcher import launch  # noqa: E402
from audit_service.jobs.settings import Settings  # noqa: E402
from audit_service.service.uploads import PRECHECK_ENGINE, _check_limits  # noqa: E402
from builders import IMAGE_SHAPE, PlainCNN, export_torchscript  # noqa: E402

SPEC = {"group": "C4", "shifts": [], "options": {"n_probes": 8, "n_noise_probes": 8, "ig_steps": 2, "bootstrap": 0,
                                                  "jacobian_probes": 2}}


def main(n: int) -> None:
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
        root = Path(tmp)
        settings = Settings(data_dir=root)
        model = export_torchscript(PlainCNN(seed=0), IMAGE_SHAPE, root / "model.pt")
        codes: dict[int, int] = {}
        failures: list[tuple[int, str]] = []
        start = time.perf_counter()
        for _ in range(n):
            workdir = root / "w" / uuid.uuid4().hex
            (workdir / "tmp").mkdir(parents=True)
            (workdir / "model").symlink_to(model)
            (workdir / "task.json").write_text(json.dumps({"kind": "audit", "engine": PRECHECK_ENGINE, "spec": SPEC,
                                                           "model": str(workdir / "model")}))
            rc = launch(workdir, _check_limits(workdir, settings), warm=True).wait(120)
            codes[rc] = codes.get(rc, 0) + 1
            if rc != 0:
                failures.append((rc, (workdir / "stderr.log").read_text(errors="replace")[-300:]))
        print(f"{n} children in {time.perf_counter() - start:.0f} s, exit codes {codes}")
        for rc, tail in failures[:3]:
            print(f"  rc {rc}: {tail}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
