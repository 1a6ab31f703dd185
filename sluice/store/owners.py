"""Ownership filters: an owner sees its own rows; None (an admin key) sees every owner's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, true


def owned(column: Any, owner: str | None) -> ColumnElement[bool]:
    """`column = owner`, or no condition at all for owner None (admin keys)."""
    if owner is None:
        return true()
    result: ColumnElement[bool] = column == owner
    return result
