"""The service's one error hierarchy and its one mapping to HTTP status.

Every error the service raises on purpose is a ``ServiceError``; its class decides the status
(``STATUS``) and the ``type`` in the JSON body ``{"error": {"type": ..., "message": ...}}``.
Errors from elsewhere are translated once, in ``service.app``: ``encoders.InvalidInput`` -> 422,
request validation -> 400, unknown routes -> 404.

    ServiceError
    ├── MalformedRequest      400  the request does not parse or fit the schema
    ├── Unauthorized          401  API key missing or wrong
    ├── NotFound              404  unknown item, route, or a media file not on disk
    ├── Gone                  410  a media file changed since it was indexed
    ├── PayloadTooLarge       413  over a byte, pixel, duration, text or count cap
    ├── UnsupportedMedia      415  modality the format registry cannot tell, or not in this model
    ├── TooManyHeaders        431  more request headers than the server takes
    ├── InvalidContent        422  well-formed request, content that cannot be used
    ├── Overloaded            429  a queue or the in-flight byte budget is full (Retry-After)
    ├── ClientGone            499  the client went away before its request was read (nobody
    │                              reads this answer; it labels the request in /metrics)
    └── Unavailable           503  not ready, no index loaded, the model failed, or a file
                                   of the served index is damaged (``index_damaged``)

``RetryLater`` adds a ``Retry-After`` header to the class it is mixed into (``Overloaded``,
``service.ray_serve.RayUnreachable``); it has no status of its own.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error the service raises on purpose; the message is shown to the client."""

    type: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class MalformedRequest(ServiceError):
    type = "malformed_request"


class Unauthorized(ServiceError):
    type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    type = "not_found"


class Gone(ServiceError):
    type = "gone"


class PayloadTooLarge(ServiceError):
    type = "too_large"


class UnsupportedMedia(ServiceError):
    type = "unsupported_media"


class TooManyHeaders(ServiceError):
    type = "too_many_headers"


class InvalidContent(ServiceError):
    type = "invalid_content"


class ClientGone(ServiceError):
    type = "client_disconnected"


class RetryLater(ServiceError):
    """An error the client should retry after ``retry_after_s`` seconds (the ``Retry-After``
    header). A mixin: the class it is combined with decides the status and ``type``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(RetryLater):
    type = "overloaded"


class Unavailable(ServiceError):
    type = "unavailable"


class NotReady(Unavailable):
    type = "not_ready"


class NoIndex(Unavailable):
    type = "no_index"


class ModelFailed(Unavailable):
    type = "model_failed"


class IndexDamaged(Unavailable):
    type = "index_damaged"


STATUS: dict[type[ServiceError], int] = {
    MalformedRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Gone: 410,
    PayloadTooLarge: 413,
    UnsupportedMedia: 415,
    TooManyHeaders: 431,
    InvalidContent: 422,
    Overloaded: 429,
    ClientGone: 499,
    Unavailable: 503,
}


def status_of(err: ServiceError) -> int:
    """The HTTP status of an error: its nearest class in ``STATUS``."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500
