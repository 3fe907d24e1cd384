"""The OpenAPI file documents exactly the routes the server has."""

from __future__ import annotations

from pathlib import Path

import yaml
from aiohttp import web

import synapse.api.http as http


def test_every_route_is_documented_and_every_documented_route_exists():
    spec = yaml.safe_load((Path(http.__file__).parent / "openapi.yaml").read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops if method != "parameters"}
    app = web.Application()
    http.add_routes(app)
    served = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical.replace("{key:.+}", "{key}")
        served.add((route.method, path))
    assert served == documented
