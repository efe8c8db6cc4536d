"""``audit-service`` command line: audit, demo, serve, worker, submit, reference.

Exit status: 0 the command ran and, for ``audit``, its gate passed; 1 the gate failed; 2 bad input (one line
on stderr saying what to fix, never a traceback); 130 interrupted. ``audit`` always gates: the exit status is
the PASS / FAIL its summary prints, against ``--require`` or, without it, the default gate ``genuine,learned``
(``--strict`` fails a borderline verdict too), so a pipeline that runs ``audit-service audit ...`` stops on a
model whose invariance is absent. To keep going whatever the verdict, list the labels that pass
(``--require genuine,learned,incidental,undecided,not_invariant,trivial,not_genuine``) or ignore status 1;
a missing model or probe file is a status 2 within a second, before the engine (torch) is imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..engine.errors import AuditError

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2

#: Modules that contribute sub-commands: each has ``add_parsers(subparsers) -> None`` and sets
#: ``func(args) -> int`` on its parsers. Imported lazily so ``audit`` does not pay for Flask.
_COMMAND_MODULES = (
    "audit_service.cli.audit_commands",    # audit, demo
    "audit_service.cli.service_commands",  # serve, worker, submit
    "audit_service.cli.reference_commands",  # reference train / reproduce
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="audit-service",
        description="Audit whether a classifier's invariance to a group is genuine, learned, or absent.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a layer not installed / not written yet
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AuditError as exc:
        print(f"audit-service: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("audit-service: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
