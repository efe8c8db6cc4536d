"""The ``audit-service`` command line: ``main`` (``cli/main.py``) and the modules that add its commands
(``audit_commands``: audit, symmetrize, demo; ``service_commands``: serve, worker, submit;
``reference_commands``: reference train / reproduce). It sits on top of every other layer."""

from .main import main

__all__ = ["main"]
