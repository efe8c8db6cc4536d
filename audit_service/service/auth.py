"""Bearer-token authentication and tenants.

Tokens come from ``AUDIT_TOKENS="token:tenant,token:tenant"`` and/or ``AUDIT_TOKENS_FILE`` (one
``token:tenant`` per line, ``#`` comments). Each request's ``Authorization: Bearer <token>`` names its
tenant (``g.tenant``); every job belongs to a tenant and every lookup is filtered by it, so another
tenant's job id answers 404 exactly like an unknown one. Tokens are compared in constant time.

Without tokens the service is open (every request is tenant ``default``) — allowed only when bound
to a loopback address (``check_bind``; ``serve`` refuses to start otherwise and says why). An open
service answers only requests whose ``Host`` is a loopback name (a web page cannot reach it through DNS
rebinding) and refuses state-changing requests a browser marks as cross-site (``Sec-Fetch-Site``) or
sends from another origin (``Origin``): a page the developer visits cannot submit or delete audits.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Flask, g, request

from ..jobs.settings import Settings, read_operator_file
from ..jobs.store import DEFAULT_TENANT

#: answered without a token: liveness, readiness and the contract itself
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.yaml", "/", "/docs"})
#: the front door's static files (Swagger UI); the pages hold no data, their scripts send the token
PUBLIC_PREFIXES = ("/docs/static/",)
MIN_TOKEN_CHARS = 16


class TokenConfigError(ValueError):
    """``AUDIT_TOKENS`` / ``AUDIT_TOKENS_FILE`` is malformed (the message says which entry and why)."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
    for n, entry in enumerate(e for e in entries if e):
        token, sep, tenant = entry.rpartition(":")
        token, tenant = token.strip(), tenant.strip()
        if not sep or not token or not tenant:
            raise TokenConfigError(f"Expected entries `token:tenant` in {source}, but entry {n + 1} has no "
                                   f"`:tenant` part")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenConfigError(f"Expected tokens of at least {MIN_TOKEN_CHARS} characters in {source}, but "
                                   f"the token of tenant {tenant!r} has {len(token)}; generate one with "
                                   f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if len(tenant) > 128 or not all(c.isalnum() or c in "-_." for c in tenant):
            raise TokenConfigError(f"Expected a tenant name of letters, digits, '-', '_' or '.' (at most 128) in "
                                   f"{source}, but got {tenant!r}")
        if token in tokens and tokens[token] != tenant:
            raise TokenConfigError(f"Expected each token once in {source}, but one names two tenants")
        tokens[token] = tenant
    return tokens


def load_tokens(settings: Settings) -> dict[str, str]:
    """token -> tenant from ``AUDIT_TOKENS`` and ``AUDIT_TOKENS_FILE`` (empty: the service is open)."""
    tokens = parse_tokens(settings.tokens, "AUDIT_TOKENS") if settings.tokens else {}
    if settings.tokens_file:
        path = settings.tokens_file
        text = read_operator_file(path, "AUDIT_TOKENS_FILE", TokenConfigError)
        for token, tenant in parse_tokens(text, f"AUDIT_TOKENS_FILE {path}").items():
            if tokens.get(token, tenant) != tenant:
                raise TokenConfigError("Expected each token once, but AUDIT_TOKENS and AUDIT_TOKENS_FILE give "
                                       "one token two tenants")
            tokens[token] = tenant
    return tokens


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings) -> str | None:
    """Why the service must not start on ``host`` with these settings, or None when it may."""
    from ..jobs.write_back import WriteBackConfigError, WriteBackPolicy

    try:
        tokens = load_tokens(settings)
        WriteBackPolicy.from_settings(settings)  # a broken rule is a refusal to start, not a 403 per request
    except (TokenConfigError, WriteBackConfigError) as exc:
        return str(exc)
    if tokens or is_loopback(host):
        return None
    return (f"refusing to serve on {host!r} without authentication: anyone who can reach that address could "
            f"upload models for this machine to run. Set AUDIT_TOKENS='token:tenant,...' or AUDIT_TOKENS_FILE "
            f"(one token:tenant per line), or bind to 127.0.0.1")


class Authenticator:
    def __init__(self, tokens: dict[str, str], admin_tenants: set[str]) -> None:
        self._tokens = [(t.encode(), tenant) for t, tenant in tokens.items()]
        self.admin_tenants = admin_tenants

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def tenant_for(self, token: str) -> str | None:
        given = token.encode()
        found = None
        for candidate, tenant in self._tokens:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(candidate, given):
                found = tenant
        return found

    def is_admin(self, tenant: str) -> bool:
        return not self.enabled or tenant in self.admin_tenants


#: methods that change nothing: a cross-site page may cause them (it cannot read the answer: no CORS)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def guard_open_mode() -> None:
    """``Forbidden`` for a request an open (token-less) service must not answer: a ``Host`` that is not a
    loopback name (DNS rebinding), or a state-changing request from another site (cross-site form posts)."""
    from .errors import Forbidden

    name = _host_name(request.host)
    if not is_loopback(name):
        raise Forbidden(f"Expected a loopback Host header (localhost, 127.0.0.1 or [::1]) on this service, which "
                        f"runs without tokens, but got {request.host[:100]!r}; open the service by its loopback "
                        f"address, or set AUDIT_TOKENS to serve other names")
    if request.method in SAFE_METHODS:
        return
    site = request.headers.get("Sec-Fetch-Site", "")
    origin = request.headers.get("Origin", "")
    if site and site not in ("same-origin", "none"):
        raise Forbidden(f"Expected a request from this service's own pages or a client, but the browser marks it "
                        f"{site[:40]!r}; a service without tokens refuses changes requested by other web sites")
    if origin and origin != "null" and not is_loopback(_host_name(origin.split("://", 1)[-1])):
        raise Forbidden(f"Expected a request from this service's own origin, but it comes from {origin[:100]!r}; a "
                        f"service without tokens refuses changes requested by other web sites")
    if origin == "null":
        raise Forbidden("Expected a request from this service's own origin, but it comes from an opaque origin "
                        "('null'); a service without tokens refuses changes requested by other web sites")


def _host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the name alone."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def init_auth(app: Flask, settings: Settings) -> Authenticator:
    admins = {t.strip() for t in settings.admin_tenants.split(",") if t.strip()}
    auth = Authenticator(load_tokens(settings), admins)
    app.extensions["audit_auth"] = auth

    @app.before_request
    def _authenticate() -> None:
        from .errors import Unauthorized

        if not auth.enabled:
            guard_open_mode()
            g.tenant = DEFAULT_TENANT
            return
        if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Expected an `Authorization: Bearer <token>` header; ask the operator for a token",
                               headers={"WWW-Authenticate": 'Bearer realm="audit"'})
        tenant = auth.tenant_for(token.strip())
        if tenant is None:
            raise Unauthorized("the bearer token is not valid for this service",
                               headers={"WWW-Authenticate": 'Bearer realm="audit", error="invalid_token"'})
        g.tenant = tenant

    return auth
