"""The one authentication dependency of both APIs: ``caller: CallerDep`` in a route.

PLACEHOLDER (being replaced on the tenancy branch): every request is the open caller.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from tenancy.caller import OPEN, Caller


def current_caller() -> Caller:
    return OPEN


CallerDep = Annotated[Caller, Depends(current_caller)]
