"""Human review in Label Studio: the server refforge starts (:mod:`.server`) and its client (:mod:`.labelstudio`)."""

from refforge.review.server import (
    ReviewError,
    ReviewServerError,
    ServerInfo,
    server_status,
    start_server,
    stop_server,
)

__all__ = ["ReviewError", "ReviewServerError", "ServerInfo", "server_status", "start_server", "stop_server"]
