"""/metrics stays bounded, guarded and off the event loop however many sessions and workers a
server holds: per-session and per-worker series up to the configured limits, the rest folded
into ``_other`` with exact sums, label values cut short, a scrape well under 1 MB at the default
limits, and a bearer token needed when the server has an admin key or a metrics token.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optserver.api.app import create_app
from optserver.config import Settings
from optserver.store import SessionStore, StoreLimits
from tests.live import LiveServer, live_server

ADMIN = "metrics-admin-key"
TOKEN = "metrics-scrape-token"
MB = 1_000_000
SESSIONS, WORKERS = 20, 40  # over the default limits (16 sessions, 8 workers)
BAD_EVERY = 5  # every fifth worker also pushes a gradient of the wrong shape


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def worker_name(k: int) -> str:
    """256 characters, the longest a worker id may be; some multi-byte and some quoted."""
    tail = '\u00e9"\\' if k % 3 == 0 else "w"
    return (f"{k:04d}-" + tail * 256)[:256]


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value), from an exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def total(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in parsed[name])


def fill(
    server: LiveServer, sessions: int, workers: int, headers: dict[str, str]
) -> list[dict[str, Any]]:
    """Sessions, each pushed to by ``workers`` named workers (one push each, some also a
    refused one), over HTTP."""
    with httpx.Client(timeout=30) as client:
        created = []
        for _ in range(sessions):
            r = client.post(
                server.url + "/v1/sessions",
                json={"optimizer": "sgd", "params": {"w": [0.0]}},
                headers=headers,
            )
            assert r.status_code == 201, r.text
            created.append(r.json())

    def push(session: dict[str, Any]) -> None:
        url = f"{server.url}/v1/sessions/{session['id']}/step"
        with httpx.Client(timeout=30, headers=auth(session["token"])) as client:
            for k in range(workers):
                body = {"grads": {"w": [1.0]}, "worker": worker_name(k), "base_version": 0}
                assert client.post(url, json=body).status_code == 200
                if k % BAD_EVERY == 0:
                    bad = {"grads": {"w": [1.0, 2.0]}, "worker": worker_name(k)}
                    assert client.post(url, json=bad).status_code == 422

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(push, created))
    return created


@pytest.fixture(scope="module")
def filled() -> Iterator[LiveServer]:
    """Default metric limits, an admin key and a metrics token; more sessions and workers than
    the limits show."""
    with live_server(admin_key=ADMIN, metrics_token=TOKEN) as server:
        fill(server, SESSIONS, WORKERS, auth(ADMIN))
        yield server


def scrape(server: LiveServer, token: str = TOKEN) -> str:
    r = httpx.get(server.url + "/metrics", headers=auth(token), timeout=30)
    assert r.status_code == 200, r.text
    return r.text


# --- a real server -------------------------------------------------------------------------


def test_a_scrape_of_a_full_server_is_small_and_bounded(filled: LiveServer) -> None:
    text = scrape(filled)
    assert len(text.encode()) < MB
    parsed = samples(text)
    defaults = Settings()
    sessions = {labels["session"] for labels, _ in parsed["optserver_session_bytes"]}
    assert len(sessions) == defaults.metrics_sessions + 1
    assert "_other" in sessions
    workers: dict[str, set[str]] = defaultdict(set)
    for labels, _ in parsed["optserver_worker_pushes_total"]:
        workers[labels["session"]].add(labels["worker"])
        for value in labels.values():
            assert len(value.encode()) <= defaults.metrics_label_bytes, value
    assert set(workers) == sessions
    for session, names in workers.items():
        if session != "_other":
            assert len(names) == defaults.metrics_workers + 1, session  # the shown ones + _other
            assert "_other" in names
    assert workers["_other"] == {"_other"}


def test_folded_series_keep_the_totals_exact(filled: LiveServer) -> None:
    parsed = samples(scrape(filled))
    pushes = SESSIONS * (WORKERS + len(range(0, WORKERS, BAD_EVERY)))
    refused = SESSIONS * len(range(0, WORKERS, BAD_EVERY))
    steps = SESSIONS * WORKERS
    assert total(parsed, "optserver_steps_applied_total") == steps
    assert total(parsed, "optserver_pushes_received_total") == pushes
    assert parsed["optserver_pushes_rejected_total"] == [({"reason": "shape-mismatch"}, refused)]
    # Every worker was named: the per-worker series, folded or not, add up to the same.
    assert any(
        labels["worker"] == "_other" for labels, _ in parsed["optserver_worker_pushes_total"]
    )
    assert total(parsed, "optserver_worker_pushes_total") == pushes
    assert total(parsed, "optserver_worker_applied_total") == steps
    assert total(parsed, "optserver_worker_rejected_total") == refused
    assert total(parsed, "optserver_worker_staleness_count") == steps
    assert total(parsed, "optserver_push_staleness_count") == steps
    # A folded series stands for many workers: it has no "last version seen" of its own.
    for labels, _ in parsed["optserver_worker_last_base_version"]:
        assert labels["worker"] != "_other"


def test_metrics_need_a_token_when_the_server_has_an_admin_key(filled: LiveServer) -> None:
    for headers in ({}, auth("wrong"), {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.get(filled.url + "/metrics", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["status"] == 401
        assert problem["type"].endswith(":unauthorized")
        assert "/metrics" in problem["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "optserver_" not in r.text
    assert "optserver_steps_applied_total" in scrape(filled, ADMIN)
    assert "optserver_steps_applied_total" in scrape(filled, TOKEN)
    assert httpx.get(filled.url + "/healthz").status_code == 200  # the probes stay open


def test_a_heavy_scrape_does_not_stall_the_event_loop() -> None:
    """With limits raised so that a scrape is large (several MB, most of a second to build),
    /healthz still answers at once while scrapes run back to back."""
    with live_server(
        metrics_sessions=1000, metrics_workers=1024, metrics_label_bytes=256
    ) as server:
        fill(server, 4, 400, {})
        size = len(httpx.get(server.url + "/metrics", timeout=60).content)
        assert size > 5 * MB  # heavy enough that building it on the loop would show
        stop = threading.Event()
        scraped = []

        def scrape_forever() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    scraped.append(client.get(server.url + "/metrics").status_code)

        scrapers = [threading.Thread(target=scrape_forever) for _ in range(2)]
        for t in scrapers:
            t.start()
        latencies = []
        try:
            time.sleep(0.1)
            with httpx.Client(timeout=10) as client:
                for _ in range(30):
                    start = time.perf_counter()
                    assert client.get(server.url + "/healthz").status_code == 200
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.01)
        finally:
            stop.set()
            for t in scrapers:
                t.join()
    assert scraped and set(scraped) == {200}
    assert statistics.median(latencies) < 0.05, latencies
    assert max(latencies) < 0.5, latencies


# --- in-process: the default limits at full scale, and the finer rules -----------------------


def full_store(sessions: int, workers: int) -> SessionStore:
    """``sessions`` sessions of ``workers`` workers with 256-character names each (built in
    the store directly: a million pushes over HTTP would take too long)."""
    store = SessionStore(StoreLimits.from_settings(Settings(max_sessions=sessions)))
    names = [worker_name(k) for k in range(workers)]
    for _ in range(sessions):
        session, _ = store.create(optimizer="sgd", params={"w": np.zeros(1, np.float32)})
        for k, name in enumerate(names):
            stats = session.workers.get(name)
            assert stats is not None
            stats.pushes, stats.applied, stats.last_base_version = 3, 2, k
            stats.rejected["stale-gradient"] = 1
            stats.staleness.observe(k % 100)
        session.pushes_received = 3 * workers
        session.steps_applied = session.version = 2 * workers
        session.rejected["stale-gradient"] = workers
    return store


def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(call())


def test_the_default_limits_bound_a_scrape_of_a_full_server() -> None:
    """1,000 sessions (the default limit), each with 1,024 workers (as many as a session
    remembers) of 256-character names: under 1 MB, and the totals exact."""
    defaults = Settings()
    assert defaults.metrics_sessions < defaults.max_sessions
    store = full_store(defaults.max_sessions, 1024)
    app = create_app(defaults, store=store)
    start = time.perf_counter()
    r = get(app, "/metrics")
    first = time.perf_counter() - start
    assert r.status_code == 200
    assert len(r.content) < MB, len(r.content)
    start = time.perf_counter()
    again = get(app, "/metrics")
    assert time.perf_counter() - start < max(first, 1.0)  # unchanged sessions are not re-read
    parsed = samples(again.text)
    n, workers = defaults.max_sessions, 1024
    assert total(parsed, "optserver_pushes_received_total") == 3 * workers * n
    assert total(parsed, "optserver_steps_applied_total") == 2 * workers * n
    assert total(parsed, "optserver_pushes_rejected_total") == workers * n
    assert total(parsed, "optserver_worker_pushes_total") == 3 * workers * n
    assert total(parsed, "optserver_worker_applied_total") == 2 * workers * n
    assert total(parsed, "optserver_worker_rejected_total") == workers * n
    assert total(parsed, "optserver_worker_staleness_count") == workers * n
    assert total(parsed, "optserver_push_staleness_count") == 0  # none observed per session
    series = Counter(labels["session"] for labels, _ in parsed["optserver_worker_pushes_total"])
    assert len(series) == defaults.metrics_sessions + 1
    assert series["_other"] == 1
    newest = {s.id for s in store.sessions()[-defaults.metrics_sessions :]}
    assert set(series) == newest | {"_other"}  # the newest sessions are the ones shown
    assert all(
        count == defaults.metrics_workers + 1 for s, count in series.items() if s != "_other"
    )


def test_workers_keep_their_series_when_others_become_busier() -> None:
    store = SessionStore(StoreLimits.from_settings(Settings()))
    session, _ = store.create(optimizer="sgd", params={"w": np.zeros(1, np.float32)})
    app = create_app(Settings(metrics_workers=3), store=store)
    for name in "abcdef":
        session.workers.get(name)
    first = samples(get(app, "/metrics").text)
    shown = {labels["worker"] for labels, _ in first["optserver_worker_pushes_total"]}
    assert shown == {"d", "e", "f", "_other"}  # the most recently active, when first seen
    for name in "abc":
        session.workers.get(name)  # now the busiest
    later = samples(get(app, "/metrics").text)
    assert {labels["worker"] for labels, _ in later["optserver_worker_pushes_total"]} == shown


def test_long_and_unencodable_names_become_short_distinct_labels() -> None:
    store = SessionStore(StoreLimits.from_settings(Settings()))
    session, _ = store.create(optimizer="sgd", params={"w": np.zeros(1, np.float32)})
    names = ["x" * 255 + "1", "x" * 255 + "2", "lone \ud800 surrogate", "_other"]
    for name in names:
        stats = session.workers.get(name)
        assert stats is not None
        stats.pushes = 1
    app = create_app(Settings(metrics_label_bytes=32), store=store)
    r = get(app, "/metrics")
    assert r.status_code == 200, r.text
    parsed = samples(r.text)
    labels = [labels["worker"] for labels, _ in parsed["optserver_worker_pushes_total"]]
    assert all(len(label.encode()) <= 32 for label in labels), labels
    assert len(labels) == len(set(labels)) == 4  # the worker named "_other" has its series
    assert total(parsed, "optserver_worker_pushes_total") == len(names)


def test_invented_http_methods_share_one_label() -> None:
    app = create_app(Settings())

    async def call() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/healthz")
            for k in range(50):
                await client.request(f"BREW{k}", "/healthz")

    asyncio.run(call())
    parsed = samples(get(app, "/metrics").text)
    methods = {labels["method"] for labels, _ in parsed["optserver_http_requests_total"]}
    assert methods == {"GET", "other"}


#: (settings, bearer token sent, status): guarded once an admin key or a metrics token is set.
WHO_MAY_SCRAPE: list[tuple[dict[str, Any], str | None, int]] = [
    ({"metrics_token": TOKEN}, None, 401),
    ({"metrics_token": TOKEN}, TOKEN, 200),
    ({"metrics_token": TOKEN}, "wrong", 401),
    ({"metrics_token": TOKEN}, ADMIN, 401),
    ({"admin_key": ADMIN}, None, 401),
    ({"admin_key": ADMIN}, TOKEN, 401),
    ({"admin_key": ADMIN}, ADMIN, 200),
    ({"admin_key": ADMIN, "metrics_token": TOKEN}, TOKEN, 200),
    ({"admin_key": ADMIN, "metrics_token": TOKEN}, ADMIN, 200),
    ({"admin_key": ADMIN, "metrics_token": TOKEN}, "wrong", 401),
    ({"admin_key": ADMIN, "metrics_public": True}, None, 200),
    ({"metrics_token": TOKEN, "metrics_public": True}, None, 200),
    ({}, None, 200),
]


def test_who_may_scrape() -> None:
    for settings, credentials, status in WHO_MAY_SCRAPE:
        app = create_app(Settings(**settings))
        r = get(app, "/metrics", None if credentials is None else auth(credentials))
        case = (settings, credentials)
        assert r.status_code == status, (case, r.text)
        if status == 401:
            assert r.headers["content-type"].startswith("application/problem+json"), case
            assert r.json()["status"] == 401, case
        else:
            assert "optserver_steps_applied_total" in r.text, case
