"""Tokens of the admin HTTP API (bridge/api): made with the CLI, shown once, stored as SHA-256, scoped, revocable.

    scope      read     every GET of the admin endpoints, /metrics
               write    read, and every change (the CLI's admin actions)
               backend  the backend endpoints: the cloud public key, purpose-bound derived keys, device tokens,
                        API-key checks (Infuse IoT's "your backend owns the workflow")
    tenant     one tenant, or every tenant (then also tenants themselves)

A token's events name it as their actor: `api:<token id>`.
"""

import hmac
from dataclasses import dataclass

from bridge.claims import identifiers
from bridge.errors import UsageError
from bridge.ops.admin import CLI_ACTOR
from bridge.storage.records import AdminToken
from bridge.storage.store import Store
from provwire.models import Event, rfc3339

SCOPES = ("read", "write", "backend")
MAX_NAME_CHARS = 64
_TOKEN_CHARS = len(identifiers.new_admin_token())


@dataclass(frozen=True)
class Created:
    token: AdminToken
    raw: str  # shown once


def create_admin_token(
    store: Store, name: str, scopes: list[str], tenant: str | None, now: int, actor: str = CLI_ACTOR
) -> Created:
    if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise UsageError(f"an admin token's name must be 1-{MAX_NAME_CHARS} printable characters")
    if not scopes or set(scopes) - set(SCOPES):
        raise UsageError(f"scopes are one or more of {', '.join(SCOPES)}")
    tenant_id = None if tenant is None else store.tenant_id(tenant)
    raw = identifiers.new_admin_token()
    token = AdminToken(
        id=identifiers.new_admin_token_id(),
        name=name,
        token_hash=identifiers.digest(raw),
        scopes=frozenset(scopes),
        tenant_id=tenant_id,
        tenant_name=tenant,
        created_at=now,
    )
    store.add_admin_token(token, _event("admin_token.created", token, now, actor))
    return Created(token, raw)


def revoke_admin_token(store: Store, token_id: str, now: int, actor: str = CLI_ACTOR) -> AdminToken:
    """Refuse the token from its next request on; NotFound if there is none. Revoking again changes nothing."""
    return store.revoke_admin_token(token_id, now, lambda token: _event("admin_token.revoked", token, now, actor))


def authenticate(store: Store, presented: str) -> AdminToken | None:
    """The live admin token `presented` is, or None (unknown, malformed or revoked)."""
    if len(presented) != _TOKEN_CHARS or not presented.startswith("pba_"):
        return None
    token = store.admin_token_by_hash(identifiers.digest(presented))
    if token is None or token.revoked_at is not None:
        return None
    # The lookup is by digest; compare again in constant time so no shortcut in the index leaks anything.
    return token if hmac.compare_digest(token.token_hash, identifiers.digest(presented)) else None


def permits(token: AdminToken, scope: str) -> bool:
    return scope in token.scopes or (scope == "read" and "write" in token.scopes)


def actor_of(token: AdminToken) -> str:
    return f"api:{token.id}"


def _event(name: str, token: AdminToken, now: int, actor: str) -> Event:
    return Event(event=name, time=rfc3339(now), tenant=token.tenant_name or "_", actor=actor, key_name=token.name)
