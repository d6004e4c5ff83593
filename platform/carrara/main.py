"""The control plane's ASGI application: `uvicorn carrara.main:app`."""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import APIRouter, FastAPI

from carrara import __version__
from carrara.audit.router import router as audit_router
from carrara.auth.cache import TokenCache
from carrara.auth.router import router as tokens_router
from carrara.body_limit import BodyLimitMiddleware, RouteLimit
from carrara.datasets.router import router as datasets_router
from carrara.deployments.router import router as deployments_router
from carrara.deployments.router import scorers_router
from carrara.errors import API_ERROR_RESPONSES, install_error_handlers
from carrara.feature_sets.router import router as feature_sets_router
from carrara.health.router import router as health_router
from carrara.leadership import Leadership, StartLoops, single_run_key
from carrara.logging_setup import configure_logging
from carrara.monitoring.router import alerts_router
from carrara.monitoring.router import router as monitoring_router
from carrara.monitoring.service import ViewCache
from carrara.registry.router import router as models_router
from carrara.secret_keys import deployment_signing_keys, session_secret
from carrara.settings import Settings, get_settings
from carrara.streams.resilience import LoopHealth
from carrara.streams.topics import TopicAdmin
from carrara.training.router import router as runs_router
from carrara.ui.router import install_ui

log = structlog.get_logger(__name__)


API_ROUTERS: tuple[APIRouter, ...] = (
    datasets_router,
    feature_sets_router,
    runs_router,
    models_router,
    deployments_router,
    monitoring_router,
    alerts_router,
    scorers_router,
    tokens_router,
    audit_router,
)


def include_api(app: FastAPI) -> None:
    """Everything under /api/v1; every route there needs an API token (see carrara.deps).

    Each router is included in the app itself, not in an /api/v1 router included in turn:
    FastAPI matches a request through every level of nested routers again (twice), which cost
    ~0.1 ms per request and level."""
    for router in API_ROUTERS:
        app.include_router(router, prefix="/api/v1", responses=API_ERROR_RESPONSES)


def ensure_control_topics(settings: Settings) -> None:
    """Create the deployments, scorer-status (compacted) and alerts topics if needed.

    A Kafka outage only logs a warning: until the topics exist, revisions and alerts wait in the
    outbox and the status consumer waits for its topic.
    """
    admin = TopicAdmin(settings.kafka_bootstrap, settings)
    for topic, compacted in (
        (settings.deployments_topic, True),
        (settings.scorer_status_topic, True),
        (settings.alerts_topic, False),
    ):
        try:
            if compacted:
                admin.ensure_compacted_topic(topic, timeout=10.0)
            else:
                admin.create_topic(topic, 1, exist_ok=True, timeout=10.0)
        except Exception as exc:
            log.warning("cannot ensure a control topic", topic=topic, error=str(exc))


SINGLE_RUN_LOOPS = ("outbox-relay", "outbox-listener", "lost-run-reaper", "scorer-status")


def single_run_loops(
    app: FastAPI, settings: Settings, signing: tuple[str, bytes] | None, election: LoopHealth
) -> StartLoops:
    """What the elected process runs (`carrara.leadership`): the outbox relay with the lost-run
    reaper on its thread, the LISTENer that wakes it on other processes' commits, and the
    scorer-status consumer. `app.state.loops` lists the loops this process runs (`/healthz`)."""
    from sqlalchemy.orm import sessionmaker

    from carrara.db import libpq_conninfo, make_engine
    from carrara.deployments.status_consumer import StatusConsumer
    from carrara.outbox.relay import BackgroundRelay, OutboxListener, OutboxRelay
    from carrara.training.reaper import reap_lost_runs

    def start() -> Callable[[], None]:
        ensure_control_topics(settings)
        # A pool of the loops' own: requests exhausting theirs never stall the relay, nor the
        # loops the requests.
        engine = make_engine(settings.database_url, pool_size=2, max_overflow=2)
        sessions = sessionmaker(bind=engine)
        reap_every = max(1.0, settings.run_heartbeat_timeout_s / 4)
        relay = BackgroundRelay(
            OutboxRelay(settings.kafka_bootstrap, signing=signing),
            sessions,
            periodic=[(reap_every, lambda session: reap_lost_runs(session, settings))],
            stall_after_s=settings.stall_timeout_s,
        )
        listener = OutboxListener(libpq_conninfo(settings.database_url))
        status_consumer = StatusConsumer(
            settings.kafka_bootstrap,
            settings.scorer_status_topic,
            sessions,
            stall_after_s=settings.stall_timeout_s,
        )
        relay.start()
        listener.start()
        status_consumer.start()
        # Replaced, never mutated: /healthz may be reading the previous mapping.
        app.state.loops = {
            "leader-election": election,
            "outbox-relay": relay.health,
            "scorer-status": status_consumer.health,
        }
        app.state.single_run = list(SINGLE_RUN_LOOPS)

        def stop() -> None:
            app.state.single_run = []
            app.state.loops = {"leader-election": election}
            status_consumer.stop()
            relay.stop()
            listener.stop()
            engine.dispose()

        return stop

    return start


def body_limit_routes(settings: Settings) -> list[RouteLimit]:
    """Routes allowed a larger body than `CARRARA_MAX_BODY_BYTES` (e.g. a model upload):
    `RouteLimit("POST", re.compile(r"/api/v1/models/[^/]+/versions"), n_bytes)`."""
    # ONNX model uploads (API and UI form): the model plus a small multipart envelope.
    upload = settings.max_model_upload_bytes + 64 * 1024
    return [
        RouteLimit("POST", re.compile(r"/api/v1/models/[^/]+/versions"), upload),
        RouteLimit("POST", re.compile(r"/ui/models/upload"), upload),
    ]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    # The secrets the API uses, and only those: refused at start when weak (README: Security).
    settings.check_secrets(session_key=True, database=True)
    session_key = session_secret(settings)
    signing_keys = deployment_signing_keys(settings)
    signing = (settings.deployments_topic, signing_keys[0]) if signing_keys else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        leadership = None
        # What the process built to start (routes, schemas, mappers, compiled queries) lives as
        # long as it does: frozen, the collector stops walking it, and it runs less often. Full
        # collections over it paused a worker for tens to hundreds of ms, every few seconds
        # under load (benchmarks/api.py: p99 at 200 requests/s).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        app.state.single_run = []
        if settings.outbox_relay_enabled:
            from carrara.db import libpq_conninfo

            health = LoopHealth("leader-election", settings.stall_timeout_s)
            leadership = Leadership(
                libpq_conninfo(settings.database_url),
                single_run_loops(app, settings, signing, health),
                key=single_run_key(
                    settings.kafka_bootstrap,
                    settings.deployments_topic,
                    settings.scorer_status_topic,
                ),
                health=health,
            )
            app.state.loops = {"leader-election": health}
            leadership.start()
        app.state.leadership = leadership
        try:
            yield
        finally:
            if leadership is not None:
                await asyncio.to_thread(leadership.stop)

    app = FastAPI(
        title="Carrara",
        version=__version__,
        description=(
            "Kafka-native ML platform: datasets pinned to Kafka offsets, training runs, "
            "models and declarative deployments. Authenticate with `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
        # /docs and /redoc are served from local assets by install_ui (no CDN: they work offline).
        docs_url=None,
        redoc_url=None,
    )
    # Tokens verified in the last CARRARA_AUTH_CACHE_S seconds authenticate without a query.
    app.state.token_cache = TokenCache(settings.auth_cache_s)
    # Metrics and verdicts computed in the last CARRARA_MONITORING_CACHE_S seconds are reused.
    app.state.monitoring_cache = ViewCache(settings.monitoring_cache_s)
    install_error_handlers(app)
    app.include_router(health_router)
    include_api(app)
    install_ui(app, session_key)
    # Outermost: a body over the limit gets 413 before any middleware or route reads it.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, routes=body_limit_routes(settings)
    )
    return app


app = create_app()
