"""Invariance audit service: is a classifier's symmetry genuine, learned, or absent?

The core library (groups, shifts, runtime, metrics, sweep, verdict, report) has no web
dependencies; ``audit_service.service`` and ``audit_service.jobs`` sit on top of it.
"""

__version__ = "0.1.0"
