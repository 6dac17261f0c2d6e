"""/metrics labels each request with the path template of the route that took it: FastAPI's
routes, the Starlette routes and mount of the docs pages (/openapi.json, the static files), and
``unmatched`` only for paths that no route matches. Never the raw path: label cardinality stays
bounded whatever clients ask for.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.live import live_server

STATIC = "/static-offline-docs/{path}"


def requests_by_label(text: str) -> Counter[tuple[str, str, str]]:
    """(method, route, status) -> count of optserver_http_requests, from an exposition."""
    out: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "optserver_http_requests":
            for sample in family.samples:
                if sample.name == "optserver_http_requests_total":
                    labels = sample.labels
                    out[labels["method"], labels["route"], labels["status"]] += int(sample.value)
    return out


def latency_counts(text: str) -> Counter[str]:
    """route -> count of optserver_http_request_seconds, from an exposition."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "optserver_http_request_seconds":
            for sample in family.samples:
                if sample.name == "optserver_http_request_seconds_count":
                    out[sample.labels["route"]] += int(sample.value)
    return out


def test_docs_routes_and_static_files_have_route_labels() -> None:
    with live_server() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        before = client.get("/metrics").text
        # Counted once answered, so in the next scrape.
        expected: Counter[tuple[str, str, str]] = Counter({("GET", "/metrics", "200"): 1})

        def get(path: str, label: str, status: int = 200) -> httpx.Response:
            response = client.get(path)
            assert response.status_code == status, (path, response.status_code)
            expected["GET", label, str(status)] += 1
            return response

        docs = get("/docs", "/docs").text
        get("/docs", "/docs")
        get("/openapi.json", "/openapi.json")
        get("/openapi.json", "/openapi.json")
        get("/openapi.json", "/openapi.json")
        get("/redoc", "/redoc")
        get("/docs/oauth2-redirect", "/docs/oauth2-redirect")
        # The assets the docs page refers to, each under the mount's one label, and a file the
        # mount does not hold (the mount took it: its label too).
        assets = re.findall(r'(?:src|href)="(/static-offline-docs/[^"]+)"', docs)
        assert len(assets) >= 2, docs
        for asset in assets:
            get(asset, STATIC)
        missing_file = f"/static-offline-docs/{uuid.uuid4().hex}.js"
        get(missing_file, STATIC, 404)
        # A method the route does not allow is still the route's.
        assert client.post("/openapi.json").status_code == 405
        expected["POST", "/openapi.json", "405"] += 1
        nowhere = [f"/{uuid.uuid4().hex}", f"/v1/{uuid.uuid4().hex}/nothing-here"]
        for path in nowhere:
            get(path, "unmatched", 404)

        after = client.get("/metrics").text
        assert requests_by_label(after) - requests_by_label(before) == expected
        by_route: Counter[str] = Counter()
        for (_, route, _), count in expected.items():
            by_route[route] += count
        assert latency_counts(after) - latency_counts(before) == by_route
        routes = {route for _, route, _ in requests_by_label(after)}
        for raw in [*assets, missing_file, *nowhere]:
            assert raw not in routes, f"the raw path {raw} is a label"
