"""What the route modules share, set once on `app.state` by `create_app` and reached with `Depends(get_state)`, so
the routes are plain module-level functions instead of closures over one big factory."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from router.auth import bearer_token
from router.infer import Infer
from router.metrics import Metrics
from router.model_tokenizer import ModelTokenizer
from router.schemas import Info
from router.validation import AdapterSpec


@dataclass(frozen=True)
class AppConfig:
    info: Info
    default_adapter_source: str = "hub"
    cors_allow_origins: tuple[str, ...] = ()
    tokenizer: ModelTokenizer | None = None  # for /tokenize and chat templates
    adapter_tiers: Callable[[], dict[str, tuple[int, int]]] | None = None  # live tier report for /info
    api_keys: tuple[str, ...] = ()  # LORAX_API_KEY: when set, generating routes need one of them (router/auth.py)
    metrics_require_key: bool = False  # LORAX_METRICS_REQUIRE_KEY: /metrics needs one of them too


@dataclass
class RouterState:
    """The request pipeline, health probe, metrics and configuration of one app."""

    infer: Infer
    health_check: Callable[[], Awaitable[None]]
    config: AppConfig
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))
    adapters_seen: dict[str, int] = field(default_factory=dict)  # adapter id -> when it first answered a request

    @property
    def model_id(self) -> str:
        return self.config.info.model_id

    def served(self, adapter: AdapterSpec) -> None:
        """Remember a single adapter that answered, for /v1/models."""
        if len(adapter.ids) == 1 and not adapter.is_base:
            self.adapters_seen.setdefault(adapter.ids[0], int(time.time()))

    def hub_token(self, request: Request) -> str | None:
        """`Authorization: Bearer <token>` stands in for a missing `api_token`, unless the bearer is our API key."""
        return None if self.config.api_keys else bearer_token(request)


def get_state(request: Request) -> RouterState:
    return request.app.state.router


State = Annotated[RouterState, Depends(get_state)]
