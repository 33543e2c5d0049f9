"""The OpenTelemetry SDK of a service process: the on/off decision, the resource, the tracer provider.

Off costs nothing: with ``OTEL_SDK_DISABLED=true`` or no OTLP endpoint configured, no SDK provider is
installed (the API's no-op tracer answers). On: resource (service.name, version, environment, host),
OTLP/HTTP exporter and batch span processor, sampler from ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``
(read by the SDK).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import trace
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from mlp.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("mlp.telemetry")

INSTRUMENTATION_NAME: Final = "mlp"
_TRACES_ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Tracing is on only when the SDK is not disabled and an OTLP traces endpoint is configured."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _TRACES_ENDPOINT_VARS)


def package_version() -> str:
    try:
        return metadata.version("inference-platform")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def resource_attributes(
    service_name: str, settings: Settings, env_attributes: Mapping[str, Any]
) -> dict[str, AttributeValue]:
    """Our defaults, overridden by what the operator set (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)."""
    defaults: dict[str, AttributeValue] = {
        "service.name": service_name,
        "service.namespace": "mlp",
        "service.version": package_version(),
        # Both spellings: older backends read `deployment.environment`, current semconv the `.name` one.
        "deployment.environment": settings.environment,
        "deployment.environment.name": settings.environment,
        "host.name": socket.gethostname(),
    }
    return {**defaults, **env_attributes}


@dataclass(frozen=True)
class Telemetry:
    """What a service got from :func:`setup_telemetry`. ``provider`` is None when tracing is off."""

    service_name: str
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @property
    def tracer(self) -> Tracer:
        if self.provider is None:
            return trace.NoOpTracer()
        return self.provider.get_tracer(INSTRUMENTATION_NAME)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Flush pending spans and stop the exporter, in at most about ``timeout_s``. True when flushed."""
        if self.provider is None:
            return True
        provider = self.provider
        done = threading.Event()
        flushed: list[bool] = []

        def flush_and_stop() -> None:
            try:
                flushed.append(provider.force_flush(int(timeout_s * 1000)))
                provider.shutdown()
            except Exception:  # exporting must never crash a stopping service
                log.warning("telemetry shutdown failed", exc_info=True)
            finally:
                done.set()

        # force_flush ignores its timeout in this SDK (opentelemetry-python#4568): bound it from outside.
        threading.Thread(target=flush_and_stop, name="otel-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("telemetry shutdown did not finish within %.1fs; pending spans dropped", timeout_s)
            return False
        return bool(flushed and flushed[0])


_installed: Telemetry | None = None
_install_lock = threading.Lock()


def setup_telemetry(service_name: str, settings: Settings, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Install the SDK tracer provider for this process (once; later calls return the first result).

    ``environ`` only feeds the on/off decision (tests); the SDK reads ``os.environ`` itself.
    """
    global _installed
    env = os.environ if environ is None else environ
    if not tracing_enabled(env):
        return Telemetry(service_name=service_name)
    with _install_lock:
        if _installed is not None:
            return _installed
        provider = _build_provider(service_name, settings)
        trace.set_tracer_provider(provider)
        _installed = Telemetry(service_name=service_name, provider=provider)
        log.info("tracing on: service %s exports OTLP/HTTP", provider.resource.attributes.get("service.name"))
        return _installed


def _build_provider(service_name: str, settings: Settings) -> TracerProvider:
    # Imported here: a service with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env_attributes = OTELResourceDetector().detect().attributes
    resource = Resource.create(resource_attributes(service_name, settings, env_attributes))
    # No sampler argument: the SDK then reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself.
    provider = TracerProvider(resource=resource)
    # No exporter/processor arguments: OTEL_EXPORTER_OTLP_* and OTEL_BSP_* apply as documented.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def installed() -> Telemetry:
    """The process's telemetry (a disabled one when :func:`setup_telemetry` did not turn tracing on)."""
    return _installed or Telemetry(service_name="unknown")
