"""Model specifications: what to predict, for whom, from which features, and when to promote.

A spec is declarative YAML under the project's ``models/`` folder (``churn.yaml``,
``purchase_propensity.yaml`` validated into :class:`ModelSpec`;
``next_best_action.yaml`` into :class:`NBATraining`). Unknown keys are errors that
name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The label definition belongs to the labels stage; a spec only refers to it.
from propensity.labels import LabelSpec, SplitSpec

__all__ = [
    "CalibrationMethod",
    "Gates",
    "LabelSpec",
    "LightGBMParams",
    "ModelSpec",
    "NBATraining",
    "NBA_SPEC_FILE",
    "SpecError",
    "SplitSpec",
    "load_spec",
    "load_nba_training",
    "MODEL_NAMES",
    "REGISTERED_MODELS",
    "registered_name",
]

#: Registered model names and the spec file each one reads.
MODEL_NAMES: dict[str, str] = {
    "churn": "churn.yaml",
    "purchase_propensity": "purchase_propensity.yaml",
    "purchase_24h": "purchase_24h.yaml",
}
#: The next-best-action spec file (its action catalog stays in ``actions.yaml``).
NBA_SPEC_FILE = "next_best_action.yaml"
_CATALOG_FILE = "actions.yaml"
_ALIASES = {"purchase": "purchase_propensity"}
#: Every registered model and the short names each command accepts for it.
REGISTERED_MODELS: dict[str, tuple[str, ...]] = {
    "churn": (),
    "purchase_propensity": ("purchase",),
    "purchase_24h": (),
    "next_best_action": ("nba",),
}


def registered_name(name: str) -> str:
    """The registered model name for a name or short name a user typed.

    Examples
    --------
    >>> registered_name("purchase"), registered_name("nba"), registered_name("churn")
    ('purchase_propensity', 'next_best_action', 'churn')
    """
    for registered, short in REGISTERED_MODELS.items():
        if name == registered or name in short:
            return registered
    known = ", ".join(n for r, short in REGISTERED_MODELS.items() for n in (*short, r))
    raise SpecError(f"unknown model {name!r}; choose one of {known}")


CalibrationMethod = Literal["auto", "isotonic", "sigmoid", "none"]


class SpecError(ValueError):
    """A model spec is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LightGBMParams(_Strict):
    """LightGBM hyper-parameters (the subset this project tunes)."""

    num_leaves: int = Field(default=31, ge=2)
    learning_rate: float = Field(default=0.05, gt=0, le=1)
    n_estimators: int = Field(default=1000, ge=1)
    min_child_samples: int = Field(default=50, ge=1)
    subsample: float = Field(default=0.8, gt=0, le=1)
    subsample_freq: int = Field(default=1, ge=0)
    colsample_bytree: float = Field(default=0.8, gt=0, le=1)
    reg_lambda: float = Field(default=1.0, ge=0)
    max_bin: int = Field(default=255, ge=2)
    #: ``balanced`` weighs positives by negatives/positives; calibration then restores
    #: probabilities, so keep ``calibration`` on when this is set.
    class_weight: Literal["balanced", "none"] = "balanced"
    num_threads: int = Field(default=0, ge=0)


class Gates(_Strict):
    """Promotion gates checked on the test window."""

    min_auc: float = Field(default=0.6, ge=0, le=1)
    max_ece: float = Field(default=0.05, ge=0, le=1)
    #: A challenger may trail the champion (scored on the same test rows) by at most this.
    max_auc_drop: float = Field(default=0.005, ge=0, le=1)
    min_rows: int = Field(default=1000, ge=0)


class ModelSpec(_Strict):
    """Everything needed to train, evaluate and promote one model.

    Examples
    --------
    >>> spec = ModelSpec(name="churn", label=LabelSpec(kind="churn", horizon_days=30),
    ...                  population="active", feature_service="churn_v1")
    >>> spec.label.horizon_days
    30
    """

    name: str = Field(min_length=1)
    description: str = ""
    label: LabelSpec
    #: ``active``: active in the lookback before the cutoff; ``known``: any event before it.
    population: Literal["active", "known"]
    feature_service: str = Field(min_length=1)
    #: Service features the model must not use, e.g. absolute timestamps kept only as
    #: inputs of on-demand features (a tree cannot extrapolate a clock to later dates).
    exclude_features: list[str] = Field(default_factory=list)
    lightgbm: LightGBMParams = LightGBMParams()
    early_stopping_rounds: int = Field(default=50, ge=1)
    calibration: CalibrationMethod = "auto"
    split: SplitSpec = SplitSpec()
    gates: Gates = Gates()
    #: Rows sampled from the test window for the SHAP summary plot.
    shap_sample: int = Field(default=2000, ge=0)
    seed: int = 42
    #: Add the BG/NBD outputs (P(alive), expected purchases, P(purchase) in the horizon,
    #: Gamma-Gamma spend), fitted at each cutoff on the purchases before it, as features.
    #: Training computes them from the lake; the feature store and scoring do not hold
    #: them yet, so such a model is for evaluation and backtests (benchmarks/bench_byod.py).
    clv_features: bool = False

    def with_horizon(self, horizon_days: int | None) -> ModelSpec:
        """Return a copy with another label horizon (``None`` keeps this one).

        A description naming the old horizon ("next 14 days") names the new one.
        """
        if horizon_days is None:
            return self
        old = self.label.horizon_days
        label = self.label.model_copy(update={"horizon_days": horizon_days})
        description = re.sub(rf"\b{old}([ -])day", rf"{horizon_days}\g<1>day", self.description)
        return self.model_copy(
            update={
                "label": LabelSpec.model_validate(label.model_dump()),
                "description": description,
            }
        )


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r} in {source}")
        else:
            parts.append(f"{where!r} in {source}: {item['msg']}")
    return "; ".join(parts)


def load_spec(name_or_path: str | Path, models_dir: str | Path | None = None) -> ModelSpec:
    """Load a model spec by registered name (``churn``, ``purchase``) or by YAML path.

    Parameters
    ----------
    name_or_path : str or Path
        A registered model name (``churn``, ``purchase_propensity`` or its short form
        ``purchase``) or the path of a YAML spec.
    models_dir : str or Path, optional
        Folder holding the specs (``settings.path(settings.models_dir)``); defaults to
        ``./models``.

    Returns
    -------
    ModelSpec

    Examples
    --------
    >>> spec = load_spec("churn", "models")  # doctest: +SKIP
    >>> spec.feature_service  # doctest: +SKIP
    'churn_v3'
    """
    key = _ALIASES.get(str(name_or_path), str(name_or_path))
    if key in MODEL_NAMES:
        path = Path(models_dir or "models") / MODEL_NAMES[key]
    else:
        path = Path(name_or_path)
        if not path.suffix:
            known = ", ".join([*MODEL_NAMES, *_ALIASES])
            raise SpecError(f"unknown model {str(name_or_path)!r}; expected one of {known}")
    if not path.exists():
        raise SpecError(f"model spec {path} does not exist")
    data = _read_yaml(path)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc, str(path))) from None


class NBATraining(_Strict):
    """How uplift models are trained, evaluated and gated (``models/next_best_action.yaml``)."""

    name: str = Field(default="next_best_action", min_length=1)
    description: str = ""
    feature_service: str = Field(default="nba_v1", min_length=1)
    learner: Literal["t", "x", "dr"] = "x"
    params: dict[str, Any] = Field(default_factory=dict)
    train_fraction: float = Field(default=0.7, gt=0, lt=1)
    n_boot: int = Field(default=300, ge=0)
    seed: int = 42
    #: Keep per-row uplifts only if the learned policy, cross-fitted over ``gate_folds``
    #: folds of the training rows, beats the best single action at this confidence (else
    #: each action gets its average effect: the best single action); null disables the gate.
    #: Off by default for the event-lake path: on a few thousand exposures, learners fitted on
    #: half the waves judge the full-data model too harshly. The tabular path gates by default.
    gate_level: float | None = Field(default=None, gt=0, lt=1)
    gate_folds: int = Field(default=2, ge=2)
    #: Apply contact caps when evaluating policies (eligibility rules always apply).
    evaluate_with_contact_policy: bool = False
    min_test_rows: int = Field(default=500, ge=0)
    #: A challenger's DR value may trail the champion's (same test rows) by at most this.
    max_value_drop: float = Field(default=0.0, ge=0)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping")
    return data


def load_nba_training(models_dir: str | Path | None = None) -> NBATraining:
    """Read ``next_best_action.yaml`` from ``models_dir`` (defaults if there is none).

    A project from before that file existed kept these settings as the
    ``training:`` section of ``actions.yaml``: it is still read, with a
    :class:`DeprecationWarning`.

    Examples
    --------
    >>> load_nba_training("models").learner  # doctest: +SKIP
    'x'
    """
    folder = Path(models_dir or "models")
    path = folder / NBA_SPEC_FILE
    if path.exists():
        data, source = _read_yaml(path), str(path)
    else:
        legacy = folder / _CATALOG_FILE
        data = (_read_yaml(legacy).get("training") or {}) if legacy.exists() else {}
        source = f"{legacy} (training:)"
        if data:
            warnings.warn(
                f"{legacy}: the 'training:' section is deprecated; move it to {path}",
                DeprecationWarning,
                stacklevel=2,
            )
    try:
        return NBATraining.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc, source)) from None
