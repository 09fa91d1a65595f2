"""Seam: SGLang's HTTP app gains GET /tokenwise/info (plugin version, probe sha256, mode,
threshold: tokenwise_safety.info), added just before the server starts, only when the
plugin is on. The same identity is exported as a Prometheus gauge from the scheduler
(patches/layer_capture.py), so a mixed fleet shows on both."""
from __future__ import annotations

from tokenwise_safety.info import describe

from .server_args import ATTR

LAUNCH = "sglang.srt.entrypoints.http_server.launch_server"
PATH = "/tokenwise/info"


def before_launch_server(server_args, *args, **kwargs):
    config = getattr(server_args, ATTR, None)
    if config is None:
        return
    from sglang.srt.entrypoints.http_server import app  # noqa: PLC0415 (the launcher's process only)
    if any(getattr(route, "path", None) == PATH for route in app.routes):
        return
    body = describe(config)

    async def tokenwise_info() -> dict:
        return body
    app.add_api_route(PATH, tokenwise_info, methods=["GET"])
