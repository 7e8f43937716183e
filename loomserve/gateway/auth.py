"""API keys, the tenants they belong to, and the middleware that demands them.

Only SHA-256 digests of keys are stored or loaded, from two sources:

- a keys file, read once at start::

      {"keys": [{"tenant": "acme", "name": "ci", "sha256": "<64 hex digits>",
                 "limits": {"requests_per_minute": 60, "tokens_per_minute": 40000}}]}

- Redis, read on every request, so keys can be added and revoked while replicas run::

      HSET loomserve:keys:<sha256> tenant acme name ci limits '{"requests_per_minute": 60}'

``limits`` is optional: a key that sets it has buckets of its own besides its
tenant's (fields as in ``gateway.limits.Limits``).

A client presents its key as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.
Every path needs one except the exact paths allowed at construction. With no
source configured at all, the gateway is open and every request is tenant "default".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loomserve.gateway.circuit_breaker import CircuitBreaker
from loomserve.gateway.limits import Limits
from loomserve.gateway.protocol import APIError

log = logging.getLogger(__name__)

KEY_PREFIX = "lsk-"
REDIS_KEY_PREFIX = "loomserve:keys:"
DIGEST_PREFIX_LEN = 12
OPEN_TENANT = "default"

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Tenants name Redis keys (inside a Cluster hash tag) and cache salts: keep them plain.
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key for a client and the digest to configure: ``("lsk-...", "<sha256 hex>")``."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: read it from ``request.state.principal`` (``scope["state"]["principal"]``)."""

    tenant: str
    key_name: str
    key_digest_prefix: str  # enough to tell keys apart in logs and rate-limit buckets, useless to forge one
    limits: Limits | None  # the key's own limits, on top of its tenant's


@dataclass(frozen=True)
class KeyRecord:
    tenant: str
    name: str
    sha256: str
    limits: Limits | None = None

    def __post_init__(self) -> None:
        if not _TENANT_RE.fullmatch(self.tenant):
            raise ValueError(f"tenant {self.tenant!r} must be 1-64 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit")
        if not _DIGEST_RE.fullmatch(self.sha256):
            raise ValueError(f"sha256 of key {self.name!r} must be 64 lowercase hex digits (hash_key's output), "
                             f"not the key itself")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        unknown = sorted(set(data) - {"tenant", "name", "sha256", "limits"})
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        limits = data.get("limits")
        if limits is not None and not isinstance(limits, Mapping):
            raise ValueError("limits must be an object")
        return cls(tenant=str(data["tenant"]), name=str(data.get("name", "")), sha256=str(data["sha256"]),
                   limits=Limits.from_dict(limits) if limits is not None else None)

    def principal(self) -> Principal:
        return Principal(self.tenant, self.name, self.sha256[:DIGEST_PREFIX_LEN], self.limits)


def load_keys_file(path: str | Path) -> list[KeyRecord]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the keys file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'the keys file {path} must hold {{"keys": [...]}}')
    records = []
    for i, entry in enumerate(data["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: keys[{i}] must be an object")
        try:
            records.append(KeyRecord.from_dict(entry))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: keys[{i}]: {e}") from e
    digests = [r.sha256 for r in records]
    if len(set(digests)) != len(digests):
        raise ValueError(f"{path}: the same key digest appears more than once")
    log.info("loaded %d API keys of %d tenants from %s", len(records), len({r.tenant for r in records}), path)
    return records


def add_key_to_file(path: str | Path, tenant: str, name: str) -> str:
    """Make a key for ``tenant``, add its digest to the keys file at ``path`` (created if
    missing) and return the key: the one time it exists outside the client."""
    path = Path(path)
    data: dict[str, Any] = {"keys": []}
    if path.exists():
        load_keys_file(path)  # refuses a malformed file before anything is written
        data = json.loads(path.read_text())
    key, digest = generate_key()
    record = KeyRecord(tenant=tenant, name=name, sha256=digest)
    data["keys"].append({"tenant": record.tenant, "name": record.name, "sha256": record.sha256})
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)
    return key


class KeyStoreUnavailable(Exception):
    pass


class RedisKeySource:
    """Keys in Redis hashes named by digest, read on each request so revocation is immediate.

    ``redis`` is the gateway's shared client (see gateway/services.py); each lookup gets
    ``timeout_s``, connecting included.
    """

    def __init__(self, redis: aioredis.Redis, timeout_s: float = 0.25, prefix: str = REDIS_KEY_PREFIX) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._redis = redis
        self.breaker = CircuitBreaker("API-key Redis")

    async def lookup(self, digest: str) -> KeyRecord | None:
        """The record of ``digest``, None if there is none; KeyStoreUnavailable if Redis cannot say.

        Looking up by digest is not the timing leak that a lookup by key would be: the digest
        is derived from a secret but reveals nothing usable about it (finding a key for a digest
        means inverting SHA-256), so learning how far a guessed digest matched gives an attacker
        nothing, and the key itself never reaches a comparison.
        """
        if not self.breaker.allow():
            raise KeyStoreUnavailable
        try:
            async with asyncio.timeout(self.timeout_s):
                # The shared client does not decode: names and values arrive as bytes.
                raw = cast("dict[bytes, bytes]", await self._redis.hgetall(self.prefix + digest))
        except (RedisError, OSError) as e:  # OSError covers TimeoutError
            self.breaker.record_failure(e)
            raise KeyStoreUnavailable from e
        except BaseException:
            self.breaker.record_abandoned()
            raise
        self.breaker.record_success()
        if not raw:
            return None
        try:
            fields = {name.decode(): value.decode() for name, value in raw.items()}
            limits = fields.get("limits")
            return KeyRecord(tenant=fields["tenant"], name=fields.get("name", ""), sha256=digest,
                             limits=Limits.from_dict(json.loads(limits)) if limits else None)
        except (KeyError, TypeError, ValueError) as e:  # ValueError covers UnicodeDecodeError
            # Refused rather than half-trusted: a record without a valid tenant has no limits to apply.
            log.error("API key %s in Redis has an invalid record (%s); refusing it", digest[:DIGEST_PREFIX_LEN], e)
            return None


class KeyStore:
    """Every configured key: the file's in memory, then, with ``redis_keys``, Redis's, through
    the client ``connect_redis`` hands over when the gateway starts (inside its event loop)."""

    def __init__(self, records: Iterable[KeyRecord] = (), redis_keys: bool = False) -> None:
        self._records = list(records)
        self._digests = [bytes.fromhex(r.sha256) for r in self._records]
        self.redis_keys = redis_keys
        self.redis_source: RedisKeySource | None = None

    @property
    def is_open(self) -> bool:
        return not self._records and not self.redis_keys

    def connect_redis(self, redis: aioredis.Redis) -> None:
        self.redis_source = RedisKeySource(redis)

    async def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, None if it is unknown; KeyStoreUnavailable if Redis cannot say."""
        presented = hashlib.sha256(key.encode()).digest()
        match: KeyRecord | None = None
        # Every digest is compared, matched or not, so the time taken says nothing of which
        # or how many configured keys share a prefix with the presented one.
        for record, digest in zip(self._records, self._digests, strict=True):
            if hmac.compare_digest(digest, presented):
                match = record
        if match is None and self.redis_keys:
            if self.redis_source is None:  # not connected yet: the gateway has not started
                raise KeyStoreUnavailable
            match = await self.redis_source.lookup(presented.hex())
        return match.principal() if match is not None else None


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bearer(value: str) -> str:
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise _Refused("invalid_api_key", "the Authorization header must be 'Bearer <API key>'")
    return parts[1].strip()


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The one key in ``Authorization: Bearer`` or ``x-api-key``; refused if absent, malformed or ambiguous."""
    keys = set()
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name == b"authorization":
            key = _bearer(raw_value.decode("latin-1"))
        elif name == b"x-api-key":
            key = raw_value.decode("latin-1").strip()
        else:
            continue
        if not key or any(c.isspace() for c in key):
            raise _Refused("invalid_api_key", "the API key is empty or contains whitespace")
        keys.add(key)
    if not keys:
        raise _Refused("missing_api_key",
                       "no API key: send 'Authorization: Bearer <API key>' or 'x-api-key: <API key>'")
    if len(keys) > 1:
        # Two different keys: a proxy may have checked one and we would use the other.
        raise _Refused("invalid_api_key", "more than one API key in the request; send exactly one")
    return keys.pop()


class AuthMiddleware:
    """Deny by default: every HTTP and WebSocket path needs a valid key, except ``public_paths``.

    Public paths match ``scope["path"]`` exactly: no prefix, case or trailing-slash
    normalisation, since every rule that widens a match is one more way around the check.
    """

    def __init__(self, app: ASGIApp, keys: KeyStore, public_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = frozenset(public_paths)
        if keys.is_open:
            log.warning("NO API KEYS ARE CONFIGURED: this gateway is open to anyone who can reach it, and every "
                        "request runs as tenant %r. Configure a keys file or a Redis key source.", OPEN_TENANT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        if self.keys.is_open:
            principal = Principal(OPEN_TENANT, "", "", None)
        else:
            try:
                key = presented_key(scope["headers"])
                found = await self.keys.authenticate(key)
                if found is None:
                    log.info("refused an unknown API key for %s from %s", scope["path"], scope.get("client"))
                    raise _Refused("invalid_api_key", "the API key is not valid")
                principal = found
            except _Refused as e:
                await self._refuse(scope, receive, send, 401, APIError(401, e.message, type="authentication_error",
                                                                       code=e.code),
                                   {"www-authenticate": "Bearer"})
                return
            except KeyStoreUnavailable:
                await self._refuse(scope, receive, send, 503,
                                   APIError(503, "API keys cannot be checked right now; retry shortly",
                                            type="service_unavailable", code="auth_unavailable"),
                                   {"retry-after": "1"})
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, error: APIError,
                      headers: dict[str, str]) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": error.message})
            return
        await JSONResponse(error.body(), status_code=status, headers=headers)(scope, receive, send)
