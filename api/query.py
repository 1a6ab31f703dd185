"""Query strings carry only what a route declares: any other parameter is a 400 naming it.

Bodies already refuse unknown fields (unknown_parameter); a misspelt query parameter
(`?limt=5`, `?wiat=30`) was silently ignored instead, and the caller got the default.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.errors import ApiError

_declared_by_route: dict[int, frozenset[str]] = {}


def _declared(dependant: Dependant) -> set[str]:
    """Query parameter names of a dependant and of every dependency under it."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared(sub)
    return names


async def refuse_unknown_query(request: Request) -> None:
    """App-wide dependency: 400 unknown_parameter for a query parameter the route lacks."""
    route = request.scope.get("route")
    if not request.query_params or not isinstance(route, APIRoute):
        return
    allowed = _declared_by_route.get(id(route))
    if allowed is None:
        allowed = _declared_by_route[id(route)] = frozenset(_declared(route.dependant))
    for name in request.query_params:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(
                400,
                f"unknown query parameter {name!r} (this route takes: {known})",
                code="unknown_parameter",
                param=name,
            )
