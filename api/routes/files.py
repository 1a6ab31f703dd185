"""Files: upload (streamed), list, get, delete, download."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.auth import CallerDep, check_stored
from api.deps import Cursor, DbDep, OwnerDep, ResourceId, ScopeDep, SettingsDep, StateDep
from api.docs import COMMON, ERRORS
from api.streams import primed
from api.upload import body_limit, receive_upload
from sluice.db import Database
from sluice.errors import InvalidInput, TooLarge
from sluice.render import file_chunks, file_object, measured_bytes
from sluice.store.files import PURPOSES, delete_file, get_file, list_files

router = APIRouter(prefix="/v1/files")


def _object(db: Database, file_id: str, owner: str | None) -> dict[str, Any]:
    row = dict(get_file(db, file_id, owner))
    row["bytes"] = measured_bytes(db, row)
    return file_object(row)


@router.post("", responses=COMMON)
async def upload_file(
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    owner: OwnerDep,
    caller: CallerDep,
    state: StateDep,
) -> dict[str, Any]:
    """Store an uploaded JSONL file (multipart `file` and `purpose=batch`), parsed as a stream."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("Content-Length must be a number", param="file")
        # Refuse before reading a byte: the client learns at once, nothing is buffered.
        if int(declared) > body_limit(settings):
            raise TooLarge(f"file is larger than {settings.max_file_bytes} bytes")
    # The key's max_bytes: checked against the declared size (a chunked upload: against
    # what is stored already), before a byte of the body is read.
    await check_stored(state, caller, int(declared or 0))
    stored = await receive_upload(request, db, settings, owner)
    return await anyio.to_thread.run_sync(_object, db, stored.id, owner)


def _list(
    db: Database, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str
) -> dict[str, Any]:
    rows = list_files(db, owner, purpose=purpose, after=after, limit=limit, order=order)
    page = [dict(r) for r in rows[:limit]]
    for row in page:
        row["bytes"] = measured_bytes(db, row)
    data = [file_object(r) for r in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("", responses=COMMON)
async def get_files(
    db: DbDep,
    owner: ScopeDep,
    purpose: str | None = Query(None, max_length=32),
    after: Cursor = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """The caller's files, newest first by default (OpenAI cursor pagination)."""
    if purpose is not None and purpose not in PURPOSES:
        raise InvalidInput(
            f"purpose must be one of {', '.join(PURPOSES)}", param="purpose", code="invalid_value"
        )
    return await anyio.to_thread.run_sync(_list, db, owner, purpose, after, limit, order)


@router.get("/{file_id}", responses=ERRORS)
async def retrieve_file(file_id: ResourceId, db: DbDep, owner: ScopeDep) -> dict[str, Any]:
    """One file's object."""
    return await anyio.to_thread.run_sync(_object, db, file_id, owner)


@router.delete("/{file_id}", responses=ERRORS)
async def remove_file(file_id: ResourceId, db: DbDep, owner: ScopeDep) -> dict[str, Any]:
    """Delete a file (409 while an unfinished batch reads it)."""
    await anyio.to_thread.run_sync(delete_file, db, file_id, owner)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/{file_id}/content", responses=ERRORS)
async def file_content(file_id: ResourceId, db: DbDep, owner: ScopeDep) -> StreamingResponse:
    """The file's bytes, streamed page by page (output files are rendered from results)."""
    row = await anyio.to_thread.run_sync(get_file, db, file_id, owner)
    jsonl = str(row["filename"]).endswith(".jsonl") or row["purpose"] != "batch"
    return StreamingResponse(
        await primed(file_chunks(db, row)),
        media_type="application/jsonl" if jsonl else "application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row["id"]}.jsonl"'},
    )
