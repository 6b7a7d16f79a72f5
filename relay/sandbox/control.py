# Why this module exists: tests and benchmarks that run the sandbox in another process (the
# `sandbox` command, bench/) need to read and change the enforced limits without restarting it.
# This is that control API, on the sandbox's own HTTPS port under /_sandbox/, a prefix no Graph
# or Entra route uses, so the relay-facing routes are unaffected.
"""`GET /_sandbox/limits` and `PUT /_sandbox/limits`."""

from __future__ import annotations

import dataclasses
import json

from aiohttp import web

from .limits import LIMIT_NAMES
from .throttle import Throttle

__all__ = ["ControlService", "limits_document"]


def limits_document(throttle: Throttle) -> dict[str, object]:
    """`{"limits": {...fields...}, "violations": {...}, "ndrs": N}`."""
    return {
        "limits": dataclasses.asdict(throttle.limits),
        "violations": {name: throttle.violations[name] for name in LIMIT_NAMES},
        "ndrs": len(throttle.ndrs),
    }


class ControlService:
    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sandbox/limits", self.get_limits),
            web.put("/_sandbox/limits", self.put_limits),
        ]

    async def get_limits(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(limits_document(self._throttle))

    async def put_limits(self, request: web.Request) -> web.StreamResponse:
        """Change the fields given in a JSON object; 400 naming the problem, nothing changed."""
        try:
            changes = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _bad_request("the body must be a JSON object of limit fields to change")
        if not isinstance(changes, dict):
            return _bad_request("the body must be a JSON object of limit fields to change")
        try:
            self._throttle.set_limits(changes)
        except (TypeError, ValueError) as exc:
            return _bad_request(str(exc))
        return web.json_response(limits_document(self._throttle))


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": {"code": "BadRequest", "message": message}}, status=400)
