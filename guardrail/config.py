"""The sidecar's settings: `GUARDRAIL_*` environment variables and a TOML file, validated once.

Precedence: keyword arguments, then environment variables (`GUARDRAIL_DATABASE_URL`, nested
keys with `__`, lists as JSON), then the TOML file (`--config FILE` or `GUARDRAIL_CONFIG`),
then the defaults.  Library code never reads the environment: `load_settings` is called by the
CLI and the result is passed down.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from detectors.scorers.families import FAMILY_NAMES
from detectors.types import DEFAULT_BUDGET_FRACTION, DEFAULT_FILL, DEFAULT_N_REGIONS
from guardrail.errors import PermanentError

if TYPE_CHECKING:
    from detectors.pipeline import AuditSettings

__all__ = [
    "ConfigError",
    "ModelSettings",
    "Settings",
    "database_url",
    "load_settings",
    "masked",
]


class ConfigError(PermanentError):
    """The configuration is invalid; the message names every bad key."""


def _reference_model_dir() -> Path:
    from detectors.reference import MODEL_DIR

    return Path(MODEL_DIR)


# `org/name` as vLLM and TGI serve Hugging Face ids; no empty, `.` or `..` segment, no leading
# or trailing slash (the name becomes a metric label and a query value, never a path)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+(?:/[A-Za-z0-9_.:-]+)*$"


class ModelSettings(BaseModel):
    """One audited model, declared by name."""

    model_config = {"extra": "forbid"}

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=MODEL_NAME_PATTERN,
        description="the name clients send as `model`, as the model server serves it: "
        "`reference`, or a Hugging Face style `org/name` (segments of letters, digits and "
        "`_.:-`, joined by single slashes)",
    )
    path: Path = Field(
        description="local checkpoint directory (never a hub id); for a remote model, a "
        "directory with its config.json, tokenizer and processor files (no weights needed)"
    )
    family: str = Field(
        default="llava",
        description="the model family, from the registry in `detectors.scorers.families`: "
        + ", ".join(FAMILY_NAMES),
    )
    onnx: Path | None = Field(
        default=None,
        description="vision encoder from export-vision (Qwen2.5-VL: a file or a directory of "
        "files, one per input size)",
    )
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="weights dtype; half precision halves GPU memory and loses the 1e-5 parity",
    )
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    max_audits_per_minute: int | None = Field(default=None, ge=1)
    n_regions: int = Field(default=DEFAULT_N_REGIONS, ge=2, le=1024)
    audit_shortest_edge: int | None = Field(
        default=None,
        ge=8,
        description="ingest downscales images so their shortest side is at most this many "
        "pixels (default: the model's input size from its processor config)",
    )
    audit_max_pixels: int | None = Field(
        default=None,
        ge=64,
        description="ingest downscales images to at most this many pixels in all (default: "
        "the model's input size from its processor config)",
    )
    budget_fraction: float = Field(default=DEFAULT_BUDGET_FRACTION, gt=0.0, le=1.0)
    max_seconds_per_token: float | None = Field(default=None, gt=0.0)
    fill: Literal["black", "grey", "mean", "blur"] = Field(
        default=DEFAULT_FILL.value,
        description="what removed regions become; the model's thresholds must be calibrated "
        "for it with its n_regions and budget_fraction (`guardrail reference calibrate`)",
    )
    allow_uncalibrated: bool = Field(
        default=False,
        description="audit with settings the thresholds were not calibrated for, using the "
        "nearest calibration (the same fill first); verdicts are then less reliable",
    )
    prompt: str | None = Field(default=None, description="prompt template with the image token")
    scorer: Literal["local", "remote"] = Field(
        default="local",
        description="local: the weights in `path` run in the audit workers; remote: the "
        "model's own server scores masked images (vLLM's prompt_logprobs)",
    )
    remote_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="the model server's base URL (default: upstream_url)",
    )
    remote_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        pattern=r"^[^\s]+$",
        description="the served model name, e.g. llava-hf/llava-1.5-7b-hf (default: name)",
    )
    remote_api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the NAME of an environment variable holding the server's API key",
    )
    remote_concurrency: int = Field(default=4, ge=1, le=256, description="requests in flight")
    remote_max_requests_per_second: float | None = Field(
        default=None,
        gt=0,
        description="cap on requests per second to the server from one guardrail serve or "
        "guardrail worker command, shared out among its audit processes",
    )
    remote_prompt_logprobs: int = Field(
        default=0, ge=0, le=100, description="top-k log-probabilities asked beside each token's"
    )
    # read from the environment variable named by remote_api_key_env by `load_settings`
    _remote_api_key: str | None = PrivateAttr(default=None)

    @property
    def remote_api_key(self) -> str | None:
        return self._remote_api_key

    @field_validator("name")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError(f"a model name has no '.' or '..' segment, got: {value!r}")
        return value

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILY_NAMES:
            raise ValueError(f"family must be one of {', '.join(FAMILY_NAMES)}, got: {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _calibrated(self) -> ModelSettings:
        """The model's verdict thresholds must have been calibrated for these audit settings
        (a model never calibrated gets the defaults, recorded as uncalibrated)."""
        from detectors.calibration import load_calibration

        # raises CalibrationMismatchError
        load_calibration(self.path, self.audit_settings(), strict=not self.allow_uncalibrated)
        return self

    def audit_settings(self) -> AuditSettings:
        """How this model's samples are audited."""
        from detectors.pipeline import AuditSettings
        from detectors.types import Fill

        return AuditSettings(
            n_regions=self.n_regions,
            budget_fraction=self.budget_fraction,
            max_seconds=self.max_seconds_per_token,
            fill=Fill(self.fill),
        )


def _default_models() -> list[ModelSettings]:
    return [ModelSettings(name="reference", path=_reference_model_dir())]


class Settings(BaseSettings):
    """Everything the sidecar needs; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="GUARDRAIL_", env_nested_delimiter="__", extra="forbid"
    )

    database_url: SecretStr = SecretStr("sqlite:///guardrail.db")
    store_raw: bool = Field(default=False, description="keep raw images and prompts")
    api_tokens: list[SecretStr] = Field(default_factory=list, description="bearer tokens")
    models: list[ModelSettings] = Field(default_factory=_default_models)
    upstream_url: str | None = Field(default=None, description="OpenAI-compatible upstream")
    host: str = Field(
        default="127.0.0.1",
        description="address to listen on: loopback on a laptop; the container images set "
        "GUARDRAIL_HOST=0.0.0.0",
    )
    port: int = Field(default=8700, ge=1, le=65535)
    workers: int = Field(default=1, ge=0, le=64)
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch threads per process (default: torch's choice)"
    )
    lease_seconds: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    stop_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long an audit in flight may finish before its job "
        "is released back to the queue",
    )
    worker_liveness_seconds: float = Field(
        default=30.0, gt=0, description="a worker without a heartbeat this long is not live"
    )
    max_image_bytes: int = Field(default=20 * 2**20, ge=1024)
    max_images_per_sample: int = Field(
        default=4,
        ge=1,
        le=16,
        description="most images one sample may hold, for model families that take several "
        "(Qwen2.5-VL): audited in one search over the regions of all of them; more are "
        "refused (counted as too_many_images)",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=4096,
        le=89_000_000,
        description="largest image accepted, in pixels, read from its header before decoding",
    )
    min_image_side: int = Field(
        default=16, ge=1, description="shortest image side accepted at the audit resolution"
    )
    max_image_aspect_ratio: float = Field(
        default=20.0, ge=1.0, description="longest over shortest image side accepted"
    )
    ingest_decode_pixels: int | None = Field(
        default=None,
        ge=4096,
        description="decoded pixels in flight across concurrent ingests in one process (bounds "
        "their memory); default: max_image_pixels",
    )
    ingest_decode_wait_seconds: float = Field(
        default=5.0, gt=0, description="wait for decode capacity before answering 503"
    )
    ingest_decode_processes: int = Field(
        default=2,
        ge=1,
        le=64,
        description="child processes that decode sampled images (never the serving process)",
    )
    ingest_decode_timeout_seconds: float = Field(
        default=30.0, gt=0, description="longest one image may take to decode before a 422"
    )
    max_request_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="largest API request body in bytes (not the proxy's); default: "
        "max_image_bytes as base64 (4/3) plus 4 MiB for the text fields",
    )
    proxy_max_pending: int = Field(
        default=1000, ge=0, description="teed responses waiting for ingest before drops"
    )
    proxy_max_pending_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        description="bytes held by teed responses waiting for ingest (request and answer) "
        "before drops",
    )
    proxy_max_body_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="largest proxied request body (413 beyond)"
    )
    proxy_connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="connecting to the upstream (504 beyond)"
    )
    proxy_read_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="the upstream's longest silence: before its headers, or between two "
        "chunks of its answer (504 before the headers, the answer cut after)",
    )
    image_url_fetch: bool = Field(
        default=False,
        description="fetch http(s) image URLs of proxied chats for the audit (off: such "
        "requests are counted as not applicable)",
    )
    image_url_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="hosts image URLs may be fetched from: names (`cdn.example.com`, "
        "`*.example.com`), IP addresses or networks (`10.0.0.0/8`); empty: any host whose "
        "addresses are public.  Loopback, private and link-local addresses are refused "
        "unless listed here",
    )
    image_url_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="the whole fetch of one image URL, redirects included"
    )
    image_url_max_redirects: int = Field(default=3, ge=0, le=10)
    proxy_max_response_bytes: int = Field(
        default=8 * 2**20,
        ge=1024,
        description="largest answer copied for the tee (the client still gets all of it)",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text lines, or one JSON object per line (level, logger, message, "
        "request and sample ids) for log collectors",
    )
    access_log: bool = Field(
        default=False, description="log one line per HTTP request (uvicorn's access log)"
    )
    scheduler: bool = Field(default=True, description="run reports, spike checks, retention")
    public_url: str = Field(default="http://127.0.0.1:8700", description="for links in alerts")
    webhook_url: str | None = Field(
        default=None,
        description="spike alerts (firing and resolved) are POSTed here (GUARDRAIL_WEBHOOK_URL)",
    )
    webhook_format: Literal["generic", "slack", "alertmanager"] = Field(
        default="generic",
        description="the body's shape: the guardrail's own JSON, a Slack incoming-webhook "
        "message or Alertmanager's webhook JSON, version 4 (GUARDRAIL_WEBHOOK_FORMAT)",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key: each request carries X-Guardrail-Signature: "
        "t=<unix>,v1=<hex of HMAC(secret, '<t>.' + body)> (GUARDRAIL_WEBHOOK_SECRET; at "
        "least 16 characters)",
    )
    webhook_send_resolved: bool = Field(
        default=True,
        description="notify when a spike clears too (GUARDRAIL_WEBHOOK_SEND_RESOLVED)",
    )
    webhook_receiver: str = Field(
        default="guardrail",
        min_length=1,
        max_length=128,
        description="the `receiver` of the alertmanager format (GUARDRAIL_WEBHOOK_RECEIVER)",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="per attempt: connect, send, answer (GUARDRAIL_WEBHOOK_TIMEOUT_SECONDS)",
    )
    webhook_max_attempts: int = Field(
        default=12,
        ge=1,
        le=1000,
        description="attempts before a notification is given up as `exhausted` "
        "(GUARDRAIL_WEBHOOK_MAX_ATTEMPTS)",
    )
    webhook_max_age_seconds: float = Field(
        default=86400.0,
        gt=0,
        description="a notification not delivered this long after the state change is given "
        "up as `expired` (GUARDRAIL_WEBHOOK_MAX_AGE_SECONDS)",
    )
    webhook_backoff_seconds: float = Field(
        default=5.0,
        gt=0,
        description="first retry delay, doubled per attempt, with jitter; a Retry-After "
        "answer on 429/503 wins (GUARDRAIL_WEBHOOK_BACKOFF_SECONDS)",
    )
    webhook_max_backoff_seconds: float = Field(
        default=900.0,
        gt=0,
        description="longest retry delay (GUARDRAIL_WEBHOOK_MAX_BACKOFF_SECONDS)",
    )
    report_daily_cron: str = "0 6 * * *"
    report_weekly_cron: str = "0 6 * * mon"
    spike_check_seconds: float = Field(default=60.0, gt=0, description="spike check period")
    spike_window_minutes: float = Field(default=10.0, gt=0)
    spike_baseline_hours: float = Field(default=6.0, gt=0)
    spike_min_tokens: int = Field(default=30, ge=1)
    spike_ratio: float = Field(default=2.0, gt=1.0)
    spike_floor: float = Field(default=0.15, ge=0.0, le=1.0)
    spike_resolve_fraction: float = Field(default=0.7, gt=0.0, lt=1.0)
    retention_days: float = Field(default=30.0, gt=0)
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint verdicts are exported to as OpenTelemetry spans (a base "
        "URL as in OTEL_EXPORTER_OTLP_ENDPOINT, /v1/traces is appended; off when unset; needs "
        "the `otel` extra)",
    )
    otel_headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="headers sent with every export (e.g. Authorization), kept secret",
    )
    otel_service_name: str = Field(default="eagle-guardrail", min_length=1, max_length=256)
    otel_resource_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="extra resource attributes (e.g. openinference.project.name for Phoenix)",
    )
    otel_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="one export, retries included; the stop flush"
    )
    otel_max_queue_spans: int = Field(
        default=2048, ge=1, le=1_000_000, description="spans waiting for export before drops"
    )
    otel_max_batch_spans: int = Field(default=256, ge=1, le=100_000)
    otel_schedule_delay_seconds: float = Field(
        default=2.0, gt=0, le=600, description="longest wait before a batch is sent"
    )
    otel_max_words_per_span: int = Field(
        default=128, ge=1, le=4096, description="evaluation events per span (the rest counted)"
    )
    config_file: Path | None = Field(default=None, exclude=True)

    @field_validator("upstream_url")
    @classmethod
    def _http_upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
        except ValueError as exc:
            raise ValueError(f"upstream_url is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "upstream_url must be an http(s) URL such as http://127.0.0.1:8000 or "
                f"http://127.0.0.1:8000/v1, got: {_masked_http_url(value)!r}"
            )
        return value

    @field_validator("image_url_allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        from guardrail.service.image_fetch import parse_allowed_host

        for entry in value:
            parse_allowed_host(entry)  # raises ValueError naming the bad entry
        return value

    @field_validator("webhook_url")
    @classmethod
    def _http_webhook(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"webhook_url must be an http(s) URL, got: {value[:8]!r}...")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError(
                f"webhook_secret must be at least 16 characters, got: "
                f"{len(value.get_secret_value())}"
            )
        return value

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate names {duplicates}")
        for m in self.models:
            if m.scorer == "remote" and m.remote_url is None:
                if self.upstream_url is None:
                    raise ValueError(
                        f"models: {m.name!r} has scorer = 'remote' but neither remote_url nor "
                        "upstream_url is set"
                    )
                m.remote_url = self.upstream_url
        return self

    @field_validator("otel_endpoint")
    @classmethod
    def _otel_endpoint(cls, value: str | None) -> str | None:
        if not value:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got: {_masked_http_url(value)!r}")
        from guardrail.service.otel import OTEL_EXTRA_MISSING, otel_installed

        if not otel_installed():
            raise ValueError(OTEL_EXTRA_MISSING)
        return value

    @field_validator("otel_headers")
    @classmethod
    def _otel_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"not an HTTP header name: {name!r}")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: the value holds a line break or NUL")
        return value

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # only the values `load_settings` resolved from the environment mapping and the TOML
        # file it was given: constructing settings never reads the process's environment
        return (init_settings,)


class _EnvironSource(EnvSettingsSource):
    """`GUARDRAIL_*` variables (`__` nests) read from a given mapping, not `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # before super().__init__, which loads the variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated with `top`, nested tables merged key by key (as pydantic-settings
    merges its sources)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _source_values(
    settings_cls: type[BaseSettings],
    environ: Mapping[str, str],
    toml: Path | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The raw values for `settings_cls`: keyword overrides beat the environment, which beats
    the TOML file.  Reads only what it is given (thread-safe)."""
    values: dict[str, Any] = {}
    if toml is not None:
        values = _merged(values, TomlConfigSettingsSource(settings_cls, toml_file=toml)())
    values = _merged(values, _EnvironSource(settings_cls, environ)())
    return _merged(values, overrides)


def _config_path(config_file: str | Path | None, env: Mapping[str, str]) -> Path | None:
    path = Path(config_file) if config_file else None
    if path is None and env.get("GUARDRAIL_CONFIG"):
        path = Path(env["GUARDRAIL_CONFIG"])
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return path


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")


def _config_error(exc: ValidationError, path: Path | None) -> ConfigError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )
    source = f" in {path}" if path else ""
    return ConfigError(f"invalid configuration{source}: {problems}")


class _DatabaseSettings(BaseSettings):
    """Only the database URL, resolved like `Settings.database_url` (for `guardrail db`, which
    must work where the models are not mounted)."""

    model_config = SettingsConfigDict(
        env_prefix="GUARDRAIL_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: SecretStr = SecretStr("sqlite:///guardrail.db")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def database_url(
    config_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The database URL as `load_settings` resolves it (environment over TOML file over the
    default), without validating the rest of the configuration.

    Raises:
        ConfigError: a missing config file, or a database_url that is not a string.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    path = _config_path(config_file, env)
    try:
        settings = _DatabaseSettings(**_source_values(_DatabaseSettings, env, path, {}))
    except ValidationError as exc:
        raise _config_error(exc, path) from None
    return settings.database_url.get_secret_value()


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Resolve and validate the settings: keyword `overrides` over the environment
    (`GUARDRAIL_*`; `__` nests: `GUARDRAIL_OTEL_HEADERS__X_TOKEN`) over the TOML file
    (`config_file`, else `GUARDRAIL_CONFIG`).  `environ` is the environment to read (default:
    the process's, read and never written), so threads may load different settings at once.

    Raises:
        ConfigError: a missing config file, or invalid values (every bad key is named).
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    path = _config_path(config_file, env)
    try:
        settings = Settings(**_source_values(Settings, env, path, overrides))
    except ValidationError as exc:
        raise _config_error(exc, path) from None
    for i, m in enumerate(settings.models):
        if m.scorer == "remote" and m.remote_api_key_env:
            key = env.get(m.remote_api_key_env)
            if not key:
                raise ConfigError(
                    f"invalid configuration: models.{i}.remote_api_key_env: the environment "
                    f"variable {m.remote_api_key_env} is not set"
                )
            m._remote_api_key = key
    settings.config_file = path
    return settings


# query parameters (and path segments) that carry credentials in an HTTP URL
_SECRET_NAME = re.compile(r"key|token|secret|pass|pwd|sig|auth|cred|code|session", re.I)
_TOKEN_LIKE = re.compile(r"(?=.*[0-9])(?=.*[A-Za-z])[A-Za-z0-9_.~+/=-]{20,}")
_MASK = "****"


def _masked_http_url(url: str, *, hide_path: bool = False) -> str:
    """`url` without credentials: userinfo, credential-named or token-like query values and
    token-like path segments masked; with `hide_path`, everything after the host masked (a
    Slack webhook's path is its secret)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        userinfo = f"{_MASK}@" if "@" in parts.netloc else ""
    except ValueError:  # not a URL urllib can split: mask it whole
        return _MASK
    if hide_path:
        rest = bool(parts.path.strip("/") or parts.query or parts.fragment)
        return urlunsplit((parts.scheme, userinfo + host, f"/{_MASK}" if rest else "", "", ""))
    path = "/".join(
        _MASK if _TOKEN_LIKE.fullmatch(segment) else segment for segment in parts.path.split("/")
    )
    query = urlencode(
        [
            (k, _MASK if _SECRET_NAME.search(k) or _TOKEN_LIKE.fullmatch(v) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    fragment = _MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, userinfo + host, path, query, fragment))


def masked(settings: Settings) -> dict[str, Any]:
    """The resolved settings as JSON-able data, secrets masked: the password and credential
    parameters of every URL, the webhook URL's path, all but the end of each API token."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from storage.engine import masked_url

    data: dict[str, Any] = json.loads(settings.model_dump_json())
    url = settings.database_url.get_secret_value()
    try:
        make_url(url)
        data["database_url"] = masked_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy can parse: mask it whole
        data["database_url"] = _MASK * 2
    for key in ("upstream_url", "public_url"):
        if isinstance(data.get(key), str):
            data[key] = _masked_http_url(data[key])
    for model in data.get("models", []):
        if isinstance(model.get("remote_url"), str):
            model["remote_url"] = _masked_http_url(model["remote_url"])
    if settings.webhook_url:
        data["webhook_url"] = _masked_http_url(settings.webhook_url, hide_path=True)
    if isinstance(data.get("otel_endpoint"), str):
        data["otel_endpoint"] = _masked_http_url(data["otel_endpoint"])
    data["otel_headers"] = {name: _MASK for name in settings.otel_headers}
    # the last 4 characters help tell tokens apart; a short token is shown not at all
    data["api_tokens"] = [
        f"****{t.get_secret_value()[-4:]}" if len(t.get_secret_value()) >= 16 else "****"
        for t in settings.api_tokens
    ]
    data["config_file"] = str(settings.config_file) if settings.config_file else None
    return data
