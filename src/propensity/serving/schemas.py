"""Request and response models of the scoring API.

The request models validate every call (a malformed body is a 4xx whose
message names the field). The response models document the payloads and
are checked against real responses in the tests; the hot routes build the
same shape as plain dicts, since validating an outgoing payload per request
would cost more than scoring it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ScoreRequest",
    "BatchRequest",
    "AudienceFilter",
    "AudienceRequest",
    "Reason",
    "Alternative",
    "NextBestAction",
    "ScoreResponse",
    "BatchResponse",
    "AudienceMember",
    "AudienceResponse",
    "ErrorResponse",
    "CustomerId",
    "SCORE_FIELDS",
    "MAX_AUDIENCE_K",
    "MAX_AUDIENCE_FILTERS",
]

#: Columns of the bulk score table an audience can rank by or filter on.
SCORE_FIELDS = ("churn", "purchase_propensity", "expected_value")

#: Largest audience one ``/audience`` call returns (about 10 MB of JSON).
MAX_AUDIENCE_K = 100_000
#: Most conditions of one audience; each is a pass over the whole snapshot table.
MAX_AUDIENCE_FILTERS = 50

#: One customer identifier, the same rule in ``/score`` and in each ``/score_batch`` id.
CustomerId = Annotated[
    str,
    Field(min_length=1, max_length=128, description="Customer identifier, e.g. C0000001."),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    # Documented as closed objects, so a field the service adds without documenting it
    # fails the response checks (tests and the OpenAPI conformance run).
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Request):
    """``POST /score``: one customer."""

    customer_id: CustomerId


class BatchRequest(_Request):
    """``POST /score_batch``: many customers (at most the configured batch limit)."""

    customer_ids: list[CustomerId] = Field(min_length=1, description="Customer identifiers.")
    reasons: bool = Field(
        True,
        description="Include each model's top contributions; false skips them (about a "
        "fifth of a batch's cost with path reasons, most of it with TreeSHAP) and returns "
        "empty reasons.",
    )


class AudienceFilter(_Request):
    """One condition on the bulk scores, e.g. ``churn >= 0.6`` or ``action == discount``."""

    field: Literal["churn", "purchase_propensity", "expected_value", "action"]
    op: Literal[">=", ">", "<=", "<", "==", "!="]
    value: float | str


class AudienceRequest(_Request):
    """``POST /audience``: the top-``k`` customers by ``score`` among those passing ``filters``."""

    score: Literal["churn", "purchase_propensity", "expected_value"] = "churn"
    k: int = Field(100, ge=1, le=MAX_AUDIENCE_K)
    filters: list[AudienceFilter] = Field([], max_length=MAX_AUDIENCE_FILTERS)


class Reason(_Response):
    """One feature's contribution to a model's log-odds (LightGBM ``pred_contrib``)."""

    feature: str
    value: float | None = Field(description="The feature value; null when missing (NaN).")
    contribution: float
    direction: Literal["increases", "decreases"]


class Alternative(_Response):
    """An action considered by arbitration, best first."""

    action: str
    expected_value: float | None = Field(description="Null when the customer is not eligible.")
    eligible: bool
    reason: str


class NextBestAction(_Response):
    """The arbitrated action and why."""

    action: str = Field(description="A catalog action, or no_action.")
    expected_value: float = Field(description="Expected incremental value of the action.")
    reason: str
    holdout: bool
    alternatives: list[Alternative]


class ScoreResponse(_Response):
    """All scores of one customer from the online features."""

    customer_id: str
    churn_probability: float = Field(ge=0, le=1)
    purchase_propensity: float = Field(ge=0, le=1)
    next_best_action: NextBestAction | None
    reasons: dict[str, list[Reason]] = Field(
        description="Top 3 contributions per model (churn, purchase_propensity)."
    )
    model_versions: dict[str, str]
    features_timestamp: str | None = Field(description="ISO time of the online feature row.")
    stale: bool = Field(description="The feature row is older than its feature view's TTL.")
    missing_features: list[str] = Field(description="Features absent online, scored as NaN.")


class BatchResponse(_Response):
    """Scores for the known customers, in request order, and the unknown ids."""

    results: list[ScoreResponse]
    unknown: list[str]


class AudienceMember(_Response):
    """One selected customer; ``action`` is null when no next-best-action model is served."""

    customer_id: str
    churn: float
    purchase_propensity: float
    action: str | None
    expected_value: float | None


class AudienceResponse(_Response):
    """The selected customers, best first, and where the scores come from."""

    snapshot: str
    model_versions: dict[str, str]
    matched: int = Field(description="Customers passing the filters (before top-k).")
    customers: list[AudienceMember]


class ErrorResponse(_Response):
    """Every 4xx/5xx body: what went wrong and, for validation, where."""

    error: str
    field: str | None = None
