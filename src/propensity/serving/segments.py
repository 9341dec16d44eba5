"""``GET /segments/{name}`` and ``GET /customers/{customer_id}/segments``: the live segments.

The members the trigger runner keeps in Redis
(:class:`~propensity.activation.state.ActivationState`), read as they are: a
page of a segment's members in id order (``after`` the last id of the page
before, at most ``limit``), or the segments one customer is in. Segment names
come from the project's triggers file; a name it does not declare is a 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["CustomerSegments", "LiveSegments", "SegmentPage", "MAX_PAGE"]

#: Most members one page holds.
MAX_PAGE = 1000


class SegmentPage(BaseModel):
    """A page of a live segment's members, in id order."""

    model_config = ConfigDict(extra="forbid")

    segment: str
    size: int = Field(ge=0, description="Members of the segment now.")
    members: list[str] = Field(description="Customer ids, in id order.")
    next_after: str | None = Field(
        description="Pass as ``after`` for the next page; null on the last page."
    )


class CustomerSegments(BaseModel):
    """The live segments a customer is in."""

    model_config = ConfigDict(extra="forbid")

    customer_id: str
    segments: list[str]


class LiveSegments:
    """The project's declared segments and their members in the activation state.

    Parameters
    ----------
    settings : Settings

    Raises
    ------
    LookupError
        The project has no triggers file (so no segments).

    Examples
    --------
    >>> LiveSegments(load_settings()).page("browsing_now", None, 100)  # doctest: +SKIP
    {'segment': 'browsing_now', 'size': 2, 'members': ['C1', 'C2'], 'next_after': None}
    """

    def __init__(self, settings: Settings) -> None:
        from propensity.activation.runner import load_project_triggers
        from propensity.activation.spec import TriggerFileError
        from propensity.activation.state import ActivationState

        try:
            self.names = sorted(load_project_triggers(settings).segments)
        except TriggerFileError as exc:
            raise LookupError(f"no live segments: {exc}") from None
        config = settings.activation
        self.state = ActivationState(settings.activation_url, config.prefix, config.outbound_key)

    def page(self, name: str, after: str | None, limit: int) -> dict[str, Any]:
        """One page of ``name``'s members (``KeyError``: not a declared segment)."""
        if name not in self.names:
            raise KeyError(f"unknown segment {name!r}; declared: {', '.join(self.names) or 'none'}")
        members, size = self.state.segment_members(name, after=after, limit=limit)
        last = members[-1] if len(members) == limit else None
        return {"segment": name, "size": size, "members": members, "next_after": last}

    def sizes(self) -> dict[str, int]:
        """Members of each declared segment now."""
        return self.state.segment_sizes(self.names)

    def of_customer(self, customer_id: str) -> dict[str, Any]:
        """The declared segments ``customer_id`` is in."""
        found = [s for s in self.state.customer_segments(customer_id) if s in self.names]
        return {"customer_id": customer_id, "segments": found}
