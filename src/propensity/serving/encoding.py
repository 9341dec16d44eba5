"""The ``/score_batch`` response encoded from the scored arrays; the one importer of orjson.

A batch of 1,000 customers would otherwise become some 8,000 Python dicts
(a result, its reasons, their wrappers) only to be serialized at once. Here
every float column is encoded by one ``orjson.dumps`` of its numpy array
(NaN becomes ``null``, as the dict path's ``inf_nan_mode="null"``), split
into per-value fragments, and each customer's object is joined from those
fragments and fixed pieces prepared once per batch (feature names, model
versions, timestamps). The next-best-action decisions arrive from the policy
as dicts and are encoded one by one. Measured on 1,000 synthetic rows with
reasons and decisions: dicts + pydantic-core 17.4 ms, dataclass-like
msgspec Structs 12.8 ms, these fragments 12.1 ms (a loaded machine).

The JSON equals :meth:`~propensity.serving.scorer.Scorer.score`'s dicts
encoded by the app (the tests compare them parsed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from propensity.serving.scorer import ScoredBatch, iso_timestamp

__all__ = ["batch_json"]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_INCREASES = b',"direction":"increases"}'
_DECREASES = b',"direction":"decreases"}'


def _floats(values: np.ndarray) -> list[bytes]:
    """The JSON text of every float64 value, in order (``null`` for NaN and infinities)."""
    flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return []
    return orjson.dumps(flat, option=_NUMPY)[1:-1].split(b",")


def _reasons(picked: tuple[np.ndarray, np.ndarray, np.ndarray], names: list[str]) -> list[bytes]:
    """Every row's reasons array, as :func:`propensity.serving.scorer._reason_dicts` has them."""
    top, contributions, values = picked
    k = top.shape[1]
    if k == 0:
        return [b"[]"] * len(top)
    heads = [b'{"feature":' + orjson.dumps(name) + b',"value":' for name in names]
    columns = top.reshape(-1).tolist()
    texts = _floats(contributions)
    value_texts = _floats(values)
    increases = (contributions.reshape(-1) >= 0).tolist()
    out = []
    for lo in range(0, len(columns), k):
        parts = [
            heads[columns[m]]
            + value_texts[m]
            + b',"contribution":'
            + texts[m]
            + (_INCREASES if increases[m] else _DECREASES)
            for m in range(lo, lo + k)
        ]
        out.append(b"[" + b",".join(parts) + b"]")
    return out


def batch_json(scored: ScoredBatch, fields: list[tuple[str, str]]) -> bytes:
    """``{"results": [...], "unknown": [...]}`` of a scored batch, as UTF-8 JSON.

    Parameters
    ----------
    scored : ScoredBatch
    fields : list of (str, str)
        ``(model, response field)`` of every score (:attr:`Scorer.fields
        <propensity.serving.scorer.Scorer.fields>`); a model not in ``scored`` is null.

    Examples
    --------
    >>> scored = scorer.score_columns(["C1", "nobody"])  # doctest: +SKIP
    >>> batch_json(scored, scorer.fields)  # doctest: +SKIP
    b'{"results":[{"customer_id":"C1","churn_probability":0.31,...}],"unknown":["nobody"]}'
    """
    unknown = orjson.dumps(scored.unknown)
    n = int(scored.rows.size)
    if n == 0:
        return b'{"results":[],"unknown":' + unknown + b"}"
    ids = scored.customer_ids
    # Per score: its key and the text of every row's value.
    scores = [
        (
            b',"' + key.encode() + b'":',
            _floats(scored.scores[name]) if name in scored.scores else [b"null"] * n,
        )
        for name, key in fields
    ]
    reasons = [
        (
            orjson.dumps(name) + b":",
            _reasons(picked, scored.feature_names[name]),
        )
        for name, picked in scored.reasons.items()
    ]
    versions = b',"model_versions":' + orjson.dumps(scored.versions) + b',"features_timestamp":'
    stamps: dict[float, bytes] = {}  # rows of one snapshot share a timestamp
    stale = scored.stale.tolist()
    decisions: list[Any] = scored.decisions
    rows = []
    for k, (i, stamp) in enumerate(
        zip(scored.rows.tolist(), scored.timestamps.tolist(), strict=True)
    ):
        iso = stamps.get(stamp)
        if iso is None:
            iso = stamps[stamp] = orjson.dumps(iso_timestamp(stamp))
        missing = scored.missing[k]
        parts = [b'{"customer_id":', orjson.dumps(ids[i])]
        for key, texts in scores:
            parts += (key, texts[k])
        parts += [
            b',"next_best_action":',
            orjson.dumps(decisions[k], option=_NUMPY),
            b',"reasons":{',
            b",".join(head + texts[k] for head, texts in reasons),
            b"}",
            versions,
            iso,
            b',"stale":true' if stale[k] else b',"stale":false',
            b',"missing_features":',
            orjson.dumps(missing) if missing else b"[]",
            b"}",
        ]
        rows.append(b"".join(parts))
    return b'{"results":[' + b",".join(rows) + b'],"unknown":' + unknown + b"}"
