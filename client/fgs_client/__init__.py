"""fgs client: `Client(url, api_key)` for the wire API, and the `fgs-client` CLI (fgs_client.cli)."""

from fgs_client.http_client import (
    ApiError,
    AuthenticationFailed,
    Client,
    FgsClientError,
    GenerationResult,
    JobFailed,
    ServiceUnreachable,
)

__all__ = [
    "ApiError",
    "AuthenticationFailed",
    "Client",
    "FgsClientError",
    "GenerationResult",
    "JobFailed",
    "ServiceUnreachable",
]
