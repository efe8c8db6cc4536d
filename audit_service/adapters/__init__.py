"""Adapters between the engine and the world: the command line, the HTTP client, the MLflow
registry and the demo. The jobs layer and the service use the registry adapter; nothing in the
engine imports an adapter."""
