"""Activation: triggered decisions and live segments from the event stream.

:mod:`.spec` declares and checks the triggers and segments file
(``models/triggers.yaml``) and evaluates its conditions on arrays. Its names
are re-exported here, loaded on first use, so that importing a sibling module
(delivery, say) does not import the spec's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import (
        NEXT_BEST_ACTION,
        NO_TRIGGER_ACTION,
        Crossing,
        FeatureCondition,
        KnownNames,
        ScoreCondition,
        Segment,
        Trigger,
        TriggerCondition,
        TriggerFile,
        TriggerFileError,
        default_names,
        load_triggers,
    )

__all__ = [
    "NEXT_BEST_ACTION",
    "NO_TRIGGER_ACTION",
    "Crossing",
    "FeatureCondition",
    "KnownNames",
    "ScoreCondition",
    "Segment",
    "Trigger",
    "TriggerCondition",
    "TriggerFile",
    "TriggerFileError",
    "default_names",
    "load_triggers",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".spec", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
