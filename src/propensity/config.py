"""Typed project settings: ``propensity.yaml`` overridden by ``PROPENSITY_*`` variables.

One typed tree (pydantic-settings): every field can be overridden by an
environment variable named ``PROPENSITY_<FIELD>``, nested fields joined with a
double underscore (``PROPENSITY_HORIZONS__CHURN_DAYS=45``,
``PROPENSITY_SERVING__API_KEY=...``). An unknown key in the file or in a
``PROPENSITY_`` variable is an error that names the key. This is the only
module that reads the environment for settings.
"""

from __future__ import annotations

import contextvars
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "ConfigError",
    "Events",
    "Horizons",
    "OnlineStore",
    "Serving",
    "Settings",
    "Spark",
    "Stream",
    "Streaming",
    "load_settings",
    "PROJECT_FILE",
    "ENV_PREFIX",
]

PROJECT_FILE = "propensity.yaml"
ENV_PREFIX = "PROPENSITY_"
#: Serving keys that lived at the top level before the ``serving:`` section: still
#: accepted there (and as ``PROPENSITY_<KEY>``) with a deprecation warning, for one release.
_MOVED_TO_SERVING = (
    "api_key",
    "reload_seconds",
    "batch_limit",
    "max_body_bytes",
    "body_timeout_seconds",
    "reasons_method",
)


class ConfigError(ValueError):
    """The project file or an environment override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Horizons(_Strict):
    """Default label horizons, in days."""

    churn_days: int = Field(default=30, gt=0)
    purchase_days: int = Field(default=14, gt=0)
    activity_lookback_days: int = Field(default=30, gt=0)


class Events(_Strict):
    """How event files are read (``events:`` in ``propensity.yaml``, ``PROPENSITY_EVENTS__*``).

    Attributes
    ----------
    timestamp_format : str, optional
        The format of text (or integer) timestamps: strptime codes (``%Y%m%d``) or
        ``epoch_s`` / ``epoch_ms``; ``None`` reads ISO 8601. Every ingest uses it
        (the CLI, ``Project.ingest``, the retrain job); ``--timestamp-format``
        overrides it for one command.
    """

    timestamp_format: str | None = None

    @field_validator("timestamp_format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        from propensity.events.timestamps import check_format

        check_format(value)
        return value


class OnlineStore(_Strict):
    """Where Feast keeps the latest feature values for real-time scoring."""

    kind: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: Path = Path("data/online_store.db")
    redis_url: str = "localhost:6379"


class Spark(_Strict):
    """The Spark engine's session and the training boundary (``engine: spark``).

    Attributes
    ----------
    master : str
        Spark master URL; ``local[*]`` runs in this process on every core.
    driver_memory : str
        JVM heap of the driver (in local mode it also runs the executors).
    shuffle_partitions : int
        ``spark.sql.shuffle.partitions``: Spark's default of 200 makes hundreds of
        tiny tasks on one machine; raise it with the cluster's cores.
    conf : dict of str to str
        Any further Spark configuration (``spark.executor.memory``...), applied last.
    training_rows : int
        Rows the Spark training frame is sampled down to (stratified by label) before
        it is collected to the single machine that trains.
    """

    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(default=8, gt=0)
    conf: dict[str, str] = Field(default_factory=dict)
    training_rows: int = Field(default=1_000_000, gt=0)


class Serving(_Strict):
    """The scoring API (``serving:`` in ``propensity.yaml``, ``PROPENSITY_SERVING__*``).

    Attributes
    ----------
    api_key : SecretStr, optional
        Required in the ``X-API-Key`` header when set; never shown in reprs or logs.
    reload_seconds : float
        Registry poll interval for hot reload.
    batch_limit : int
        Most ids per ``/score_batch`` call.
    max_body_bytes : int
        Largest request body of the scoring routes; a larger one is a 413,
        refused before it is read.
    body_timeout_seconds : float
        Time a client has to send a whole request body; a slower upload is a 408.
    reasons_method : {"path", "shap"}
        How the top reasons' contributions are computed: path attribution,
        about the cost of a prediction, or exact TreeSHAP.
    """

    api_key: SecretStr | None = None
    reload_seconds: float = Field(default=30.0, gt=0)
    batch_limit: int = Field(default=1000, gt=0)
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    reasons_method: Literal["path", "shap"] = "path"

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty secret is falsy: accepting it would quietly turn authentication off.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "the API key is empty or blank; set a real key, or unset it to serve "
                "without authentication"
            )
        return value


class Stream(_Strict):
    """The Redis Stream that ``propensity stream`` consumes (``stream:``, ``PROPENSITY_STREAM__*``).

    Attributes
    ----------
    url : str, optional
        The Redis holding the stream (``host:port``, ``host:port,db=N`` or
        ``redis://host:port/db``); unset means the online store's ``redis_url``.
    key : str
        The stream's key.
    group : str
        The consumer group (created at the end of the stream when absent).
    consumer : str, optional
        This consumer's name in the group; unset means ``<hostname>``, so a
        restarted consumer picks up its own pending messages at once.
    batch_size : int
        Most messages read per ``XREADGROUP`` (each may hold many events).
    block_ms : int
        How long a read waits for new messages; also how soon a stop is noticed.
    claim_idle_ms : int
        Messages delivered to a consumer and not acknowledged for this long are
        claimed (``XAUTOCLAIM``) and processed again: a killed consumer's batch.
    dead_letter_key : str
        The stream that receives bad messages and rejected events with their reason.
    log_seconds : float
        How often the counts are logged and the stream trimmed. (When events
        reach the lake is the processor's ``streaming:`` policy.)
    trim : bool
        Trim entries every group of the stream has acknowledged (``XTRIM MINID``),
        so the stream holds only work not yet done.
    """

    url: str | None = None
    key: str = "propensity:events"
    group: str = "propensity"
    consumer: str | None = None
    batch_size: int = Field(default=100, gt=0)
    block_ms: int = Field(default=1000, gt=0)
    claim_idle_ms: int = Field(default=30_000, gt=0)
    dead_letter_key: str = "propensity:events:dead"
    log_seconds: float = Field(default=10.0, gt=0)
    trim: bool = True


class Streaming(_Strict):
    """Streaming features and live events (``streaming:``, ``PROPENSITY_STREAMING__*``).

    Attributes
    ----------
    retention_hours : float
        How long tiles and applied event ids are kept online; at least the
        25 hours the longest window ("today" on a DST day) needs.
    flush_rows : int
        Staged events that trigger a flush into the event lake.
    flush_seconds : float
        Age of the oldest staged event that triggers a flush.
    """

    retention_hours: float = Field(default=48.0, ge=25.0)
    flush_rows: int = Field(default=50_000, gt=0)
    flush_seconds: float = Field(default=10.0, gt=0)


class Webhook(_Strict):
    """Where triggered decisions are posted (``activation.webhook:``).

    Attributes
    ----------
    url : str, optional
        The receiver's URL; unset means decisions go to the outbound stream only.
    secret : SecretStr, optional
        Key of the HMAC-SHA256 signature of each body (header
        ``X-Propensity-Signature: sha256=<hex>``); never logged.
    timeout_seconds : float
        Longest wait for one answer.
    max_attempts : int
        Tries per decision before it goes to the dead-letter stream.
    backoff_seconds, max_backoff_seconds : float
        The first retry's wait, doubled on each further retry up to the maximum.
    max_in_flight : int
        Decisions being delivered or waiting for a retry at once (the bound of
        the delivery queue; the outbound stream holds the rest).
    group : str
        The outbound stream's consumer group of the delivery.
    dead_letter_key : str
        The stream that receives decisions given up on, with the reason.
    """

    url: str | None = None
    secret: SecretStr | None = None
    timeout_seconds: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=8, gt=0)
    backoff_seconds: float = Field(default=0.5, gt=0)
    max_backoff_seconds: float = Field(default=60.0, gt=0)
    max_in_flight: int = Field(default=100, gt=0)
    group: str = "propensity-webhook"
    dead_letter_key: str = "propensity:decisions:dead"


class Activation(_Strict):
    """Triggered decisions and live segments (``activation:``, ``PROPENSITY_ACTIVATION__*``).

    Attributes
    ----------
    triggers_file : Path
        The triggers and segments (relative to the project root).
    url : str, optional
        The Redis of the activation state (timers, fired windows, segments)
        and of the outbound stream; unset means ``stream.url``, then the online
        store's ``redis_url``.
    prefix : str
        Prefix of the activation state's keys.
    outbound_key : str
        The stream that receives each decision delivered (hold-outs are only logged).
    webhook : Webhook
        Optional delivery of the outbound decisions to an HTTP receiver.
    """

    triggers_file: Path = Path("models/triggers.yaml")
    url: str | None = None
    prefix: str = "propensity:activation"
    outbound_key: str = "propensity:decisions"
    webhook: Webhook = Webhook()


#: The environment a :func:`load_settings` call reads (``os.environ`` when unset).
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "propensity_environ", default=None
)


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping of the current load."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        # Names are matched case-insensitively, as the stock source does.
        return {k.lower(): v for k, v in (os.environ if environ is None else environ).items()}


class Settings(BaseSettings):
    """All paths and defaults of one project.

    Relative paths are resolved against ``root`` (the folder holding
    ``propensity.yaml``), so a project works from any working directory.
    Arguments given to the constructor (the project file's values) are
    overridden by ``PROPENSITY_*`` variables.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    root: Path = Path(".")
    lake_dir: Path = Path("data/lake")
    quarantine_dir: Path = Path("data/quarantine")
    features_dir: Path = Path("data/features")
    feature_repo: Path = Path("feature_repo")
    models_dir: Path = Path("models")
    landing_dir: Path = Path("data/landing")
    jobs_dir: Path = Path("data/jobs")
    compiled_dir: Path = Path("data/compiled")  # compiled models, by content: kept across restarts
    #: Serve and bulk-score through models compiled to C (equal to LightGBM's predict;
    #: without a C compiler LightGBM predicts, logged once).
    compile_models: bool = True
    mlflow_tracking_uri: str = "sqlite:///data/mlflow.db"
    timezone: str = "UTC"
    horizons: Horizons = Horizons()
    events: Events = Events()
    online_store: OnlineStore = OnlineStore()
    serving: Serving = Serving()
    #: Where feature SQL, training frames and bulk scoring run: DuckDB in this process
    #: (default) or Spark (:mod:`propensity.spark`).
    engine: Literal["duckdb", "spark"] = "duckdb"
    spark: Spark = Spark()
    stream: Stream = Stream()
    streaming: Streaming = Streaming()
    activation: Activation = Activation()
    seed: int = 42

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file's values, which arrive as init arguments;
        # no .env or secrets-directory sources.
        return (_Environment(settings_cls), init_settings)

    def path(self, value: Path) -> Path:
        """Resolve a configured path against the project root."""
        return value if value.is_absolute() else (self.root / value).resolve()

    def compiled_models_dir(self) -> Path | None:
        """Where compiled models are cached, or ``None`` when models are not compiled."""
        return self.path(self.compiled_dir) if self.compile_models else None

    @property
    def activation_url(self) -> str:
        """The activation's Redis: ``activation.url``, ``stream.url`` or the online store's."""
        return self.activation.url or self.stream.url or self.online_store.redis_url

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI with a relative SQLite path resolved against ``root``."""
        prefix = "sqlite:///"
        uri = self.mlflow_tracking_uri
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            return prefix + str(self.path(Path(uri[len(prefix) :])))
        return uri


def _check_name(keys: list[str], var: str) -> None:
    """An unknown ``PROPENSITY_`` variable is an error (pydantic-settings would ignore it)."""
    fields: dict[str, Any] = Settings.model_fields
    for depth, key in enumerate(keys):
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} in environment variable {var}")
        annotation = fields[key].annotation
        if depth < len(keys) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"setting {key!r} in {var} has no nested fields")
            fields = annotation.model_fields


def _environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``PROPENSITY_`` variables checked by name, deprecated serving names moved."""
    env: dict[str, str] = {}
    for var, value in environ.items():
        if not var.upper().startswith(ENV_PREFIX) or var.upper() == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key in _MOVED_TO_SERVING:
            new = f"{ENV_PREFIX}SERVING__{key.upper()}"
            warnings.warn(f"{var} is deprecated: use {new}", DeprecationWarning, stacklevel=3)
            env.setdefault(new, value)
            continue
        _check_name(key.split("__"), var)
        env[var] = value
    return env


def _moved(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Top-level serving keys of an older project file, moved under ``serving:``."""
    moved = [key for key in _MOVED_TO_SERVING if key in data]
    if not moved:
        return data
    warnings.warn(
        f"{source}: {', '.join(moved)} belong under 'serving:' now (top level is deprecated)",
        DeprecationWarning,
        stacklevel=3,
    )
    data = dict(data)
    serving = dict(data.get("serving") or {})
    for key in moved:
        serving.setdefault(key, data.pop(key))
    data["serving"] = serving
    return data


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting {where!r} in {source}")
        else:
            lines.append(f"setting {where!r} in {source}: {item['msg']}")
    return "; ".join(lines)


def _build(data: dict[str, Any], environ: Mapping[str, str], source: str) -> Settings:
    token = _ENVIRON.set(environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    finally:
        _ENVIRON.reset(token)


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from a project file and ``PROPENSITY_*`` environment variables.

    Parameters
    ----------
    path : str or Path, optional
        The project file, or a folder holding ``propensity.yaml``. Defaults to
        ``$PROPENSITY_CONFIG`` or ``./propensity.yaml``. A path named here or
        in ``PROPENSITY_CONFIG`` must exist; a folder without
        ``propensity.yaml`` (or no ``./propensity.yaml``) means all defaults.
    environ : mapping, optional
        Environment to read overrides from (defaults to ``os.environ``).

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        The file is missing, not YAML, or holds an unknown or invalid setting;
        or a ``PROPENSITY_`` variable does.

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
        data = _moved(loaded, str(file))
    data.setdefault("root", str(file.resolve().parent))
    _build(data, {}, str(file))  # the file alone first, so its errors name it
    return _build(data, _environment(env), f"{file} or {ENV_PREFIX}* variables")
