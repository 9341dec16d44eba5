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
    "AudienceAction",
    "AudienceMember",
    "AudienceResponse",
    "ErrorResponse",
    "CustomerId",
    "SCORE_FIELDS",
    "FILTER_FIELDS",
    "DEPRECATED_FIELDS",
    "canonical_field",
    "MAX_AUDIENCE_K",
    "MAX_AUDIENCE_FILTERS",
]

#: Scores an audience can rank by or filter on, named as ``/score`` names them.
SCORE_FIELDS = ("churn_probability", "purchase_propensity", "next_best_action.expected_value")
#: Fields an audience filter can test: the scores and the arbitrated action.
FILTER_FIELDS = (*SCORE_FIELDS, "next_best_action.action")
#: Names ``/audience`` used before it spoke ``/score``'s vocabulary, and their
#: replacements. Still accepted for one release (the answer then carries a
#: ``Deprecation`` header and the old member fields too); removed after it.
DEPRECATED_FIELDS = {
    "churn": "churn_probability",
    "expected_value": "next_best_action.expected_value",
    "action": "next_best_action.action",
}


def canonical_field(name: str) -> str:
    """The current name of an audience field, whichever name the request used.

    Examples
    --------
    >>> canonical_field("churn"), canonical_field("purchase_propensity")
    ('churn_probability', 'purchase_propensity')
    """
    return DEPRECATED_FIELDS.get(name, name)


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


_DEPRECATED_NOTE = (
    " The names churn, expected_value and action are deprecated aliases of "
    "churn_probability, next_best_action.expected_value and next_best_action.action, "
    "accepted for one release."
)


class AudienceFilter(_Request):
    """One condition on the bulk scores, e.g. ``churn_probability >= 0.6``."""

    field: Literal[
        "churn_probability",
        "purchase_propensity",
        "next_best_action.expected_value",
        "next_best_action.action",
        "churn",
        "expected_value",
        "action",
    ] = Field(
        description="A score or the arbitrated action, named as /score names it." + _DEPRECATED_NOTE
    )
    op: Literal[">=", ">", "<=", "<", "==", "!="]
    value: float | str


class AudienceRequest(_Request):
    """``POST /audience``: the top-``k`` customers by ``score`` among those passing ``filters``."""

    score: Literal[
        "churn_probability",
        "purchase_propensity",
        "next_best_action.expected_value",
        "churn",
        "expected_value",
    ] = Field("churn_probability", description="The score to rank by." + _DEPRECATED_NOTE)
    k: int = Field(100, ge=1, le=MAX_AUDIENCE_K)
    filters: list[AudienceFilter] = Field([], max_length=MAX_AUDIENCE_FILTERS)

    def deprecated_names(self) -> list[str]:
        """The deprecated field names this request uses, each once, in order."""
        names = [self.score, *(rule.field for rule in self.filters)]
        return list(dict.fromkeys(n for n in names if n in DEPRECATED_FIELDS))


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
    purchase_24h_probability: float | None = Field(
        ge=0,
        le=1,
        description="P(a purchase in the next 24 hours); null when that model has no champion.",
    )
    next_best_action: NextBestAction | None
    reasons: dict[str, list[Reason]] = Field(
        description="Top 3 contributions per model (churn, purchase_propensity, purchase_24h)."
    )
    model_versions: dict[str, str]
    features_timestamp: str | None = Field(description="ISO time of the online feature row.")
    stale: bool = Field(description="The feature row is older than its feature view's TTL.")
    missing_features: list[str] = Field(description="Features absent online, scored as NaN.")


class BatchResponse(_Response):
    """Scores for the known customers, in request order, and the unknown ids."""

    results: list[ScoreResponse]
    unknown: list[str]


class AudienceAction(_Response):
    """The arbitrated action of an audience member and its expected value (bulk: no reasons)."""

    action: str = Field(description="A catalog action, or no_action.")
    expected_value: float | None = Field(description="Expected incremental value of the action.")


class AudienceMember(_Response):
    """One selected customer, its scores named as in ``/score``.

    ``next_best_action`` is null when no next-best-action model is served. The
    deprecated fields are present only in the answer to a request that used a
    deprecated name.
    """

    customer_id: str
    churn_probability: float = Field(ge=0, le=1)
    purchase_propensity: float = Field(ge=0, le=1)
    next_best_action: AudienceAction | None
    churn: float | None = Field(None, deprecated="use churn_probability")
    action: str | None = Field(None, deprecated="use next_best_action.action")
    expected_value: float | None = Field(None, deprecated="use next_best_action.expected_value")


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
