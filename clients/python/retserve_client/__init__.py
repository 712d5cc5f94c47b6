"""retserve-client: a Python client for the retserve HTTP API (depends on httpx only).

>>> from retserve_client import Client
>>> client = Client()  # RETSERVE_URL / RETSERVE_API_KEY, or Client(base_url, api_key)
>>> client.completions("Once upon a time", max_tokens=8, temperature=0).text
"""

from retserve_client.async_client import AsyncClient, AsyncStream
from retserve_client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RetserveError,
    ServerError,
    SessionBusy,
    Unavailable,
)
from retserve_client.sync_client import Client, Stream
from retserve_client.types import Chunk, Completion, Model, Session, SessionPage, SessionStats, Usage

__version__ = "0.1.0"
__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequest",
    "Chunk",
    "Client",
    "Completion",
    "Conflict",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RetserveError",
    "ServerError",
    "Session",
    "SessionBusy",
    "SessionPage",
    "SessionStats",
    "Stream",
    "Unavailable",
    "Usage",
]
