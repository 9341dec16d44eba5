"""The canonical behavioral event schema.

Every source (files, the simulator, orders-only transaction logs) is mapped
onto these columns before it enters the event lake. The table below is the
single source of truth: the README's schema reference and the Arrow schema of
the lake both come from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "EVENT_TYPES",
    "EVENT_FIELDS",
    "EventField",
    "ARROW_SCHEMA",
    "REQUIRED_COLUMNS",
    "NUMERIC_COLUMNS",
    "schema_markdown",
]

EVENT_TYPES: dict[str, str] = {
    "session_start": "A visit or app session began.",
    "page_view": "A page or screen was viewed.",
    "product_view": "A product detail page was viewed.",
    "search": "A search was run.",
    "add_to_cart": "An item was added to the cart.",
    "remove_from_cart": "An item was removed from the cart.",
    "checkout_start": "Checkout was started.",
    "purchase": "An order line was bought (price × quantity is its revenue).",
    "feature_use": "A product feature (``feature_name``) was used.",
    "email_open": "A marketing or lifecycle email was opened.",
    "email_click": "A link in an email was clicked.",
    "support_ticket": "A support ticket was opened.",
    "campaign_exposure": "The customer was assigned a campaign ``action`` (or control).",
}


@dataclass(frozen=True)
class EventField:
    """One column of the canonical schema."""

    name: str
    arrow_type: pa.DataType
    required: bool
    description: str


EVENT_FIELDS: tuple[EventField, ...] = (
    EventField("customer_id", pa.string(), True, "Stable customer identifier."),
    EventField(
        "event_id",
        pa.string(),
        True,
        "Unique event identifier; derived from the row's content when the source has none.",
    ),
    EventField(
        "event_timestamp",
        pa.timestamp("us", tz="UTC"),
        True,
        "When the event happened, in UTC; naive source times are read in the project time zone.",
    ),
    EventField("event_type", pa.string(), True, "One of the documented event types."),
    EventField("session_id", pa.string(), False, "Session the event belongs to."),
    EventField("product_id", pa.string(), False, "Product concerned (views, carts, purchases)."),
    EventField("category", pa.string(), False, "Product category."),
    EventField("price", pa.float64(), False, "Unit price, non-negative."),
    EventField("quantity", pa.float64(), False, "Units, non-negative."),
    EventField("order_id", pa.string(), False, "Order the purchase line belongs to."),
    EventField("feature_name", pa.string(), False, "Product feature used (``feature_use``)."),
    EventField("channel", pa.string(), False, "Channel: web, app, email, store…"),
    EventField("device", pa.string(), False, "Device class: desktop, mobile, tablet."),
    EventField("campaign_id", pa.string(), False, "Campaign of an exposure or email."),
    EventField(
        "action",
        pa.string(),
        False,
        "Campaign action assigned at ``campaign_exposure`` (``control`` for hold-outs).",
    ),
    EventField(
        "propensity",
        pa.float64(),
        False,
        "Logged probability that the assigned ``action`` was chosen, in (0, 1].",
    ),
)

ARROW_SCHEMA = pa.schema(
    [pa.field(f.name, f.arrow_type, nullable=not f.required) for f in EVENT_FIELDS]
)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in EVENT_FIELDS if f.required)
NUMERIC_COLUMNS: tuple[str, ...] = ("price", "quantity", "propensity")


def schema_markdown() -> str:
    """Render the schema as a Markdown table (used for the README)."""
    rows = ["| field | type | required | meaning |", "| --- | --- | --- | --- |"]
    for f in EVENT_FIELDS:
        rows.append(
            f"| `{f.name}` | {f.arrow_type} | {'yes' if f.required else 'no'} | {f.description} |"
        )
    rows += ["", "| event_type | meaning |", "| --- | --- |"]
    rows += [f"| `{name}` | {text} |" for name, text in EVENT_TYPES.items()]
    return "\n".join(rows)
