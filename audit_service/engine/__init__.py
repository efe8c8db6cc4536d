"""The engine: groups, shifts, runtimes, metrics, the sweep, the verdict and the report.

It imports nothing above it (no web framework, job runner, registry or reference runs); the
adapters, the jobs layer, the service and the reference runs are built on it. Its order inside is
kept by import-linter (pyproject.toml): api > audit > sweep/report/verdict > metrics > runtime >
groups/shifts > spec/errors.
"""
