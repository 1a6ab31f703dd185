"""API keys: create (the key is returned once), look up by hash, list, revoke."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import RowMapping, func, insert, select, update

from sluice.db import Database
from sluice.errors import InvalidInput, NotFound
from sluice.ids import unix
from sluice.models import TERMINAL_BATCH, api_keys, batches, files

KEY_PREFIX = "sk-sluice-"
# What `keys list` shows of a key: its fixed prefix and 4 random characters (64^4 = 16.7M
# values: enough to tell a team's keys apart, far too few to guess the other 39).
DISPLAY_CHARS = len(KEY_PREFIX) + 4
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
MAX_NAME = 128


@dataclass(frozen=True)
class KeyInfo:
    """What the API knows about the caller's key."""

    id: str
    name: str
    owner: str
    admin: bool
    expires_at: int | None
    rpm_limit: int | None
    queued_limit: int | None
    bytes_limit: int | None
    webhook_url: str | None = None  # the default webhook endpoint of its jobs and batches


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256, hex (keys are 256 random bits: no salt needed)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _positive(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise InvalidInput(f"{name} must be at least 1", param=name)
    return value


def create_key(
    db: Database,
    *,
    owner: str,
    name: str = "",
    admin: bool = False,
    expires_at: int | None = None,
    rpm_limit: int | None = None,
    queued_limit: int | None = None,
    bytes_limit: int | None = None,
    webhook_url: str | None = None,
) -> tuple[str, KeyInfo]:
    """Store a new key; returns (the key itself, shown only now; its info)."""
    if not OWNER_PATTERN.match(owner):
        raise InvalidInput(
            "owner must be 1-64 characters of letters, digits and _.:@-", param="owner"
        )
    if len(name) > MAX_NAME:
        raise InvalidInput(f"name is at most {MAX_NAME} characters", param="name")
    for value, field in (
        (rpm_limit, "rpm"),
        (queued_limit, "max_queued"),
        (bytes_limit, "max_bytes"),
    ):
        _positive(value, field)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    info = KeyInfo(
        id=f"key_{uuid.uuid4().hex[:16]}",
        name=name or owner,
        owner=owner,
        admin=admin,
        expires_at=expires_at,
        rpm_limit=rpm_limit,
        queued_limit=queued_limit,
        bytes_limit=bytes_limit,
        webhook_url=webhook_url,
    )
    with db.write() as conn:
        conn.execute(
            insert(api_keys).values(
                **info.__dict__, prefix=key[:DISPLAY_CHARS], hash=hash_key(key), created_at=unix()
            )
        )
    return key, info


def _info(row: RowMapping) -> KeyInfo:
    return KeyInfo(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        admin=bool(row["admin"]),
        expires_at=row["expires_at"],
        rpm_limit=row["rpm_limit"],
        queued_limit=row["queued_limit"],
        bytes_limit=row["bytes_limit"],
        webhook_url=row["webhook_url"],
    )


def find_key(db: Database, key: str, now: int | None = None) -> KeyInfo | None:
    """The live key (not revoked, not expired) with this value, or None."""
    now = unix() if now is None else now
    c = api_keys.c
    with db.read() as conn:
        row = (
            conn.execute(
                select(api_keys).where(
                    c.hash == hash_key(key),
                    c.revoked_at.is_(None),
                    (c.expires_at.is_(None)) | (c.expires_at > now),
                )
            )
            .mappings()
            .one_or_none()
        )
    return None if row is None else _info(row)


def list_keys(db: Database, owner: str | None = None) -> list[RowMapping]:
    """Every key (or one owner's), oldest first, without hashes."""
    cols = [c for c in api_keys.c if c.name != "hash"]
    q = select(*cols).order_by(api_keys.c.created_at, api_keys.c.id)
    if owner is not None:
        q = q.where(api_keys.c.owner == owner)
    with db.read() as conn:
        return list(conn.execute(q).mappings().all())


def revoke_key(db: Database, ident: str) -> str:
    """Revoke a key by id or display prefix (must name one key); returns its id."""
    c = api_keys.c
    with db.write() as conn:
        ids = conn.execute(select(c.id).where((c.id == ident) | (c.prefix == ident))).scalars()
        found = list(ids)
        if not found:
            raise NotFound("key", ident)
        if len(found) > 1:
            raise InvalidInput(f"{ident!r} names {len(found)} keys; revoke one by id", param="key")
        conn.execute(
            update(api_keys)
            .where(c.id == found[0], c.revoked_at.is_(None))
            .values(revoked_at=unix())
        )
    return str(found[0])


def queued_count(db: Database, owner: str) -> int:
    """The owner's requests not yet ended (from the batches' counters: no request scan)."""
    b = batches.c
    with db.read() as conn:
        value = conn.execute(
            select(func.coalesce(func.sum(b.total - b.completed - b.failed - b.dropped), 0)).where(
                b.owner == owner, b.status.not_in(TERMINAL_BATCH)
            )
        ).scalar()
    return int(value or 0)


def stored_bytes(db: Database, owner: str) -> int:
    """Bytes of the owner's uploaded files (output files are rendered from results)."""
    with db.read() as conn:
        value = conn.execute(
            select(func.coalesce(func.sum(files.c.bytes), 0)).where(
                files.c.owner == owner, files.c.purpose == "batch"
            )
        ).scalar()
    return int(value or 0)
