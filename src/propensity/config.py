"""Typed project settings loaded from ``propensity.yaml`` and the environment.

Every field can be overridden by an environment variable named
``PROPENSITY_<FIELD>`` (nested fields join with a double underscore, e.g.
``PROPENSITY_HORIZONS__CHURN_DAYS=45``). An unknown key in the file or in a
``PROPENSITY_`` variable is an error that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

__all__ = [
    "ConfigError",
    "Horizons",
    "OnlineStore",
    "Settings",
    "load_settings",
    "PROJECT_FILE",
    "ENV_PREFIX",
]

PROJECT_FILE = "propensity.yaml"
ENV_PREFIX = "PROPENSITY_"


class ConfigError(ValueError):
    """The project file or an environment override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Horizons(_Strict):
    """Default label horizons, in days."""

    churn_days: int = Field(default=30, gt=0)
    purchase_days: int = Field(default=14, gt=0)
    activity_lookback_days: int = Field(default=30, gt=0)


class OnlineStore(_Strict):
    """Where Feast keeps the latest feature values for real-time scoring."""

    kind: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: Path = Path("data/online_store.db")
    redis_url: str = "localhost:6379"


class Settings(_Strict):
    """All paths and defaults of one project.

    Relative paths are resolved against ``root`` (the folder holding
    ``propensity.yaml``), so a project works from any working directory.
    """

    root: Path = Path(".")
    lake_dir: Path = Path("data/lake")
    quarantine_dir: Path = Path("data/quarantine")
    features_dir: Path = Path("data/features")
    feature_repo: Path = Path("feature_repo")
    models_dir: Path = Path("models")
    landing_dir: Path = Path("data/landing")
    jobs_dir: Path = Path("data/jobs")
    mlflow_tracking_uri: str = "sqlite:///data/mlflow.db"
    timezone: str = "UTC"
    horizons: Horizons = Horizons()
    online_store: OnlineStore = OnlineStore()
    seed: int = 42
    # Scoring API. The key is a SecretStr so it never shows in reprs or logs.
    api_key: SecretStr | None = None
    reload_seconds: float = Field(default=30.0, gt=0)
    batch_limit: int = Field(default=1000, gt=0)
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    # "path": path attribution, about the cost of a prediction; "shap": exact TreeSHAP.
    reasons_method: Literal["path", "shap"] = "path"

    def path(self, value: Path) -> Path:
        """Resolve a configured path against the project root."""
        return value if value.is_absolute() else (self.root / value).resolve()

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI with a relative SQLite path resolved against ``root``."""
        prefix = "sqlite:///"
        uri = self.mlflow_tracking_uri
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            return prefix + str(self.path(Path(uri[len(prefix) :])))
        return uri


def _set_nested(data: dict[str, Any], keys: list[str], value: str, var: str) -> None:
    fields: dict[str, Any] = Settings.model_fields
    node = data
    for depth, key in enumerate(keys):
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} in environment variable {var}")
        annotation = fields[key].annotation
        last = depth == len(keys) - 1
        if last:
            node[key] = value
        else:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"setting {key!r} in {var} has no nested fields")
            fields = annotation.model_fields
            node = node.setdefault(key, {})


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        keys = var[len(ENV_PREFIX) :].lower().split("__")
        _set_nested(data, keys, value, var)
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting {where!r} in {source}")
        else:
            lines.append(f"setting {where!r} in {source}: {item['msg']}")
    return "; ".join(lines)


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Load settings from a project file and ``PROPENSITY_*`` environment variables.

    Parameters
    ----------
    path : str or Path, optional
        The project file, or a folder holding ``propensity.yaml``. Defaults to
        ``$PROPENSITY_CONFIG`` or ``./propensity.yaml``. A path named here or
        in ``PROPENSITY_CONFIG`` must exist; a folder without
        ``propensity.yaml`` (or no ``./propensity.yaml``) means all defaults.
    environ : dict, optional
        Environment to read overrides from (defaults to ``os.environ``).

    Returns
    -------
    Settings

    Examples
    --------
    >>> settings = load_settings("propensity.yaml")  # doctest: +SKIP
    >>> settings.horizons.churn_days  # doctest: +SKIP
    30
    """
    env = dict(os.environ if environ is None else environ)
    named = path or env.get(ENV_PREFIX + "CONFIG")
    file = Path(named or PROJECT_FILE)
    if named and not file.exists():
        # A named project file that is not there is a typo, not "all defaults":
        # defaults would start a new, empty lake beside it.
        raise ConfigError(f"project file {file} not found")
    if file.is_dir():
        file = file / PROJECT_FILE
    data: dict[str, Any] = {}
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file} must hold a mapping of settings")
        data = loaded
    try:
        Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(file))) from None
    data = _merge(data, _env_overrides(env))
    data.setdefault("root", str(file.resolve().parent))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"{file} or {ENV_PREFIX}* variables")) from None
