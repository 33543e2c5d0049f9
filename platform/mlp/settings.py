"""One settings object, read from the environment only (``MLP_*`` plus the standard ``OTEL_*``).

Secrets may come as files instead: ``MLP_SECRETS_DIR`` names a directory of files named like the
variables (``MLP_POSTGRES_DSN``, ...), as a mounted Kubernetes Secret is; a variable set in the
environment wins over its file. Outside development, placeholder credentials are refused at start-up
(fail fast).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from events.registry import DEFAULT_MODELS, REGISTRY, ModelSpec
from events.request_rules import RequestLimits

_PLACEHOLDERS = ("changeme", "change-me", "placeholder", "<", "${")


class ConfigurationError(RuntimeError):
    """A service cannot run with these settings (checked at start-up); the message says how to fix it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLP_", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    # A directory of secret files named like the variables (a mounted Kubernetes Secret). It chooses the
    # sources, so settings_customise_sources reads it from the environment before any field; a field too,
    # so that it is a known setting.
    secrets_dir: str = ""
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # The broker's management API (http://user:password@host:15672), used only by `mlp policy` and `mlp up` to
    # set the requests queues' bound; empty: rabbitmqctl on this machine.
    rabbitmq_management_url: str = ""
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/mlp"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key, so several platforms (or test runs) can share one server.
    redis_prefix: str = "mlp:"
    triton_url: str = "127.0.0.1:8001"
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002

    # Served models, entries of the model registry (events.registry): one request queue (and one
    # worker Deployment in Kubernetes) per model. `mlp up` serves registry.QUICKSTART_MODELS by default.
    models: Annotated[tuple[str, ...], NoDecode] = DEFAULT_MODELS

    # Bootstrap API keys (a Secret): "key1=user1,key2=user2/admin", treated like stored keys (docs/auth.md).
    # With none here and none stored (`mlp keys create`), development and test run open; production never.
    api_keys: str = ""
    # Pepper of the stored keys' HMAC (a Secret, required in production; development uses a fixed one).
    key_pepper: SecretStr = SecretStr("")
    # How long a replica trusts a key lookup (and the "are there keys at all" answer): a revoked key
    # stops working within this bound everywhere. At most 30 s (the promise in docs/auth.md).
    auth_cache_ttl_s: float = Field(default=5.0, gt=0, le=30)
    # Largest accepted HTTP request body, in bytes.
    max_body_bytes: int = Field(default=262_144, ge=1024)

    # Input limits at the edge (events.request_rules.RequestLimits, see request_limits()).
    max_prompt_chars: int = Field(default=32_768, ge=1)
    max_tokens_limit: int = Field(default=4_096, ge=1)
    default_max_tokens: int = Field(default=128, ge=1)

    # Ports and hosts of the HTTP services.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    read_api_host: str = "127.0.0.1"
    read_api_port: int = 8081
    public_base_url: str = "http://127.0.0.1:8081"
    # Health/metrics side ports of the services without an HTTP API of their own.
    health_host: str = "127.0.0.1"
    collector_health_port: int = 8082
    worker_health_port: int = 8083
    dispatcher_health_port: int = 8084

    # Webhooks (docs/http.md "Webhooks"; the dispatcher: docs/operations.md "Webhook dispatcher").
    # true: targets on private, loopback and link-local addresses may be called (local development and
    # tests only; refused in production).
    webhook_allow_private: bool = False
    webhook_max_per_user: int = Field(default=10, ge=1, le=1000)
    # One attempt: connect + send + the answer, at most this long; the answer's body is read up to
    # webhook_max_response_bytes and otherwise ignored. Redirects are not followed (a 3xx is a failure).
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    webhook_max_response_bytes: int = Field(default=65_536, ge=0)
    # Retries: exponential backoff with jitter (mlp.backoff) from base to cap, for the retry window (at
    # least 24 h in production), then the delivery is marked failed (`mlp webhooks replay` re-drives it).
    webhook_backoff_base_s: float = Field(default=5.0, gt=0)
    webhook_backoff_cap_s: float = Field(default=3600.0, gt=0)
    webhook_retry_window_s: float = Field(default=86_400.0, gt=0)
    # The delivery loop: how often it looks for due deliveries when idle, and how many it sends at once.
    webhook_poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    webhook_concurrency: int = Field(default=16, ge=1, le=512)
    # The full resync of the webhooks queue's per-user bindings (the backstop of the change notifications),
    # and how often one-off webhook_url targets are looked up in the event store (their added latency).
    webhook_resync_s: float = Field(default=30.0, gt=0, le=3600)
    webhook_target_scan_s: float = Field(default=1.0, gt=0, le=60)

    # Messaging.
    # declare: create the exchanges, queues and bindings at start-up (idempotent; any service may start
    # first). verify: only check that they exist, so the service's RabbitMQ user needs no configure
    # right (the gateway in Kubernetes; honoured by the gateway).
    topology: Literal["declare", "verify"] = "declare"
    prefetch: int = Field(default=200, ge=1, le=1000)
    # Ready messages a model's request queue may hold; past it the broker refuses (nacks) a publish and
    # the gateway answers 503 queue_full. Applied as a RabbitMQ policy (events.topology.requests_bound_policy).
    max_queued_per_model: int = Field(default=10_000, ge=1)
    # Triton calls a worker has in flight per model; requests arriving meanwhile form the next call's
    # batch (up to triton_max_batch rows). Two: one executing while the next is on its way.
    worker_concurrency: int = Field(default=2, ge=1)
    collector_batch_size: int = Field(default=500, ge=1)
    # How long the collector waits after a batch's first event for more. Under load batches fill while
    # the previous write runs, so a short wait costs no throughput; a long one is pure latency at low load.
    collector_batch_wait_ms: int = Field(default=2, ge=0)
    # What the collector may hold in memory while Redis is slow or away (its pod's limit is 512 Mi): the
    # status cache backlog (at the bound the oldest updates are dropped and their entries resynced from
    # Postgres) and the follow-up queue (quota commits shed, refusals wait). See docs/operations.md.
    collector_backlog_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    collector_follow_up_max_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    graceful_timeout_s: float = Field(default=20.0, gt=0)

    # Triton calls: tritonclient has no default timeout.
    triton_timeout_s: float = Field(default=10.0, gt=0)
    triton_retries: int = Field(default=3, ge=0)
    triton_backoff_s: float = Field(default=0.2, gt=0)
    # N > 0 (default 50): the worker publishes InferenceStarted only for an inference that has not
    # answered within N ms; a faster one goes from queued to its outcome (which carries started_at), is
    # never seen running and costs one event less (a publish, a delivery, an event-store row).
    # 0: InferenceStarted for every request, as it calls Triton.
    started_event_after_ms: int = Field(default=50, ge=0)
    # Requests the worker sends to Triton in one call (those it has in hand in one loop turn); at most
    # the served models' max_batch_size (64 for the models in triton_models/).
    triton_max_batch: int = Field(default=64, ge=1)

    # Quota defaults (plans in Postgres override them).
    default_plan: str = "free"
    reservation_ttl_s: int = Field(default=300, ge=1)
    # How long a request's claim and its committed record live in Redis: they answer its redeliveries (the
    # status cache, a day, answers a finished request's after that); a quota rebuild keeps its ledger snapshot
    # as long. More than reservation_ttl_s (a claim outlives its hold).
    quota_committed_ttl_s: int = Field(default=900, ge=2)
    # The quota rebuild's lock: renewed every third of it while the rebuild runs; a dead rebuilder's expires.
    quota_rebuild_lock_ttl_s: float = Field(default=30.0, gt=0)

    # Long-poll bound for GET /api/v1/inference/{id}?wait=.
    max_wait_s: float = Field(default=30.0, gt=0)
    # Long-polls one caller (a user, else a key, else a client address in open mode) may hold open at once
    # on one read API replica; one more answers 429 with Retry-After.
    max_waits_per_caller: int = Field(default=32, ge=1)
    # SSE streams (GET /api/v1/inference/{id}/stream): open at once per caller on one read API replica (one
    # more answers 429), the heartbeat comment's interval, and the longest a stream stays open (the client
    # then resumes with Last-Event-ID, as EventSource does by itself).
    max_streams_per_caller: int = Field(default=16, ge=1)
    stream_heartbeat_s: float = Field(default=15.0, gt=0)
    max_stream_s: float = Field(default=3600.0, gt=0)

    # Postgres pool of the services: how long a query may wait for a free connection, and how long a
    # statement may run, before it fails (the HTTP services answer 503) instead of piling up.
    postgres_acquire_timeout_s: float = Field(default=5.0, gt=0)
    postgres_command_timeout_s: float = Field(default=30.0, gt=0)

    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Read here, not a field: the sources are chosen before any field is.
        secrets_dir = os.environ.get("MLP_SECRETS_DIR")
        if secrets_dir:
            file_secret_settings = SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        # MLP_MODELS=basic-model,other-model (comma-separated, as people write it)
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @field_validator("models")
    @classmethod
    def _registered(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in REGISTRY]
        if unknown:
            raise ValueError(f"not in the model registry (events/registry.py): {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _claims_outlive_holds(self) -> Settings:
        if self.quota_committed_ttl_s <= self.reservation_ttl_s:
            raise ValueError("MLP_QUOTA_COMMITTED_TTL_S must be more than MLP_RESERVATION_TTL_S")
        return self

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment == "development":
            return self
        if self.environment == "production" and self.webhook_allow_private:
            raise ValueError("MLP_WEBHOOK_ALLOW_PRIVATE=true is for development and tests; production refuses it")
        if self.environment == "production" and self.webhook_retry_window_s < 86_400:
            raise ValueError(
                "MLP_WEBHOOK_RETRY_WINDOW_S is under 24 h; production retries deliveries for a day at least"
            )
        for name in ("rabbitmq_url", "postgres_dsn", "redis_url"):
            password = urlsplit(getattr(self, name)).password or ""
            if any(p in password.lower() for p in _PLACEHOLDERS):
                raise ValueError(f"MLP_{name.upper()} holds a placeholder password; set the real secret")
        if any(p in self.key_pepper.get_secret_value().lower() for p in _PLACEHOLDERS):
            raise ValueError("MLP_KEY_PEPPER holds a placeholder; set a random value (e.g. `openssl rand -hex 32`)")
        return self

    @property
    def postgres_database(self) -> str:
        return urlsplit(self.postgres_dsn).path.lstrip("/") or "mlp"

    def request_limits(self, models: Collection[str] | None = None) -> RequestLimits:
        """The limits every edge checks requests against; ``models``: the served ones (default: all)."""
        served = frozenset(self.models if models is None else models)
        return RequestLimits(
            models=served,
            max_prompt_chars=self.max_prompt_chars,
            max_tokens_limit=self.max_tokens_limit,
            default_max_tokens=self.default_max_tokens,
            specs={name: REGISTRY[name] for name in served if name in REGISTRY},
        )

    def model_specs(self) -> dict[str, ModelSpec]:
        """The registry entries of the served models."""
        return {name: REGISTRY[name] for name in self.models}

    def redacted(self, url: str) -> str:
        """The URL without its password, for logs and error messages."""
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return url.replace(f":{parts.password}@", ":***@", 1)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
