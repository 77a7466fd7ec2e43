"""Errors that reach the HTTP client, each with its status code and the reference's `error_type`."""

from __future__ import annotations


class InferError(Exception):
    """Base class: carries what the route needs to build `{"error": ..., "error_type": ...}`."""

    status_code: int = 500
    error_type: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(InferError):
    status_code = 422
    error_type = "validation"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Input validation error: {reason}")


class OverloadedError(InferError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationError(InferError):
    """A shard RPC (Prefill/Decode or an adapter RPC) failed; `reason` is the shard's message."""

    status_code = 424
    error_type = "generation"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Request failed during generation: Server error: {reason}")


class IncompleteGenerationError(InferError):
    status_code = 500
    error_type = "incomplete_generation"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class UnhealthyError(InferError):
    status_code = 503
    error_type = "healthcheck"

    def __init__(self) -> None:
        super().__init__("unhealthy")


class UnauthorizedError(InferError):
    """The server requires an API key (LORAX_API_KEY) and the request did not carry a valid one."""

    status_code = 401
    error_type = "unauthorized"
