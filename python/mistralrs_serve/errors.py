"""The exception hierarchy: one root, subclasses that say who is at fault."""

from __future__ import annotations


class MistralrsServeError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidRequestError(MistralrsServeError, ValueError):
    """The caller sent something invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineError(MistralrsServeError):
    """The engine failed while running a request (the request is ended)."""


class ModelLoadError(MistralrsServeError):
    """A model could not be found, read or understood; the message names the file and cause."""


class UnsupportedModelError(ModelLoadError):
    """The model is readable but uses an architecture or format we do not implement."""


class ChatTemplateError(InvalidRequestError):
    """A chat template failed to compile or raised while rendering."""


class ModelNotFoundError(MistralrsServeError):
    """A request names a model this server does not serve."""

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(f"The model '{model}' does not exist; this server serves {', '.join(available)}")
        self.param = "model"


class AuthenticationError(MistralrsServeError):
    """Missing or wrong API key."""


class ServerBusyError(MistralrsServeError):
    """Too many requests queued, or the model is still loading: retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(InvalidRequestError):
    """The request body is over the server's size limit."""


class RequestTimeoutError(InvalidRequestError):
    """The request body did not arrive in time (HTTP 408)."""


class NotFoundError(MistralrsServeError):
    """A stored object (a response, a file) that does not exist, was deleted or was never stored."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedEndpointError(MistralrsServeError):
    """An OpenAI endpoint this server does not implement; the message names what to use instead."""


class PayloadTooLargeError(InvalidRequestError):
    """An uploaded or fetched file is over the server's file size limit (HTTP 413)."""


class StoreUnavailableError(MistralrsServeError):
    """The shared database cannot be reached (HTTP 503): nothing was stored, retry later."""


class ReplicaUnavailableError(MistralrsServeError):
    """No replica of a scaled-out deployment could take the request, or the one serving it died (HTTP 503)."""


class StorageFullError(MistralrsServeError):
    """The data directory has no room left (ENOSPC, a quota, SQLite's "disk is full"):
    nothing was stored, and what was stored before is intact."""
