"""The service on a hospital network, tried as a careless or hostile client would: every request is
authenticated (probes and the page's static shell aside), bounded in memory and time whatever it
declares, answered with a 4xx naming the field (never a 500), labelled in /metrics by its route,
and sent back with security headers and its request id; Grad-CAM cannot stall classification.
A real `bentoml serve` (tests/service_fixtures.py) of a small model, with a tokens file."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.serving import auth
from pipeline.serving.guard import MAX_INFER_BYTES, MAX_INFER_ITEMS
from tests.registry_fixtures import PROJECT_ROOT, write_model_dir
from tests.service_fixtures import real_images, server_processes, serving

#: The worker may grow by at most this much over idle under the hostile corpus (issue's target).
RSS_RISE_LIMIT = 300 << 20


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """(base URL, token, tokens file) of a service that requires API tokens."""
    tmp = tmp_path_factory.mktemp("secured")
    tokens = tmp / "api-tokens"
    token = auth.add(tokens, "tests")
    model_dir = write_model_dir(tmp / "model", backbone="small_cnn", input_size=(48, 64))
    env = {"LESIONFLOW_AUTH": "", auth.TOKENS_ENV: str(tokens), "LESIONFLOW_MAX_IMAGE_BYTES": str(4 << 20)}
    with serving(model_dir, tmp, env_extra=env) as (base, _, _):
        yield base, token, tokens


def _jpeg() -> tuple[str, bytes, str]:
    path = real_images(1)[0]
    return path.name, path.read_bytes(), "image/jpeg"


def _blank_png(w: int = 8000, h: int = 6000) -> bytes:
    """A few-KB PNG declaring ``w`` x ``h`` pixels (48 MP: the largest image accepted)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (128, 90, 80)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _infer_body(n: int, shape: tuple[int, int, int] = (3, 48, 64)) -> bytes:
    """An /infer body of ``n`` valid items (zero images at the model's input size)."""
    import base64
    import json

    pixels = base64.b64encode(bytes(int(np.prod(shape)))).decode()
    return json.dumps({"items": [{"pixels": pixels} for _ in range(n)]}).encode()


# ----------------------------------------------------------------------------------------------
# authentication


def test_every_route_but_probes_and_the_page_shell_needs_a_token(secured):
    base, token, tokens = secured
    with httpx.Client(base_url=base, timeout=60) as c:
        for path in ("/livez", "/readyz", "/health", "/", "/docs", "/web/app.js", "/metrics"):
            assert c.get(path).status_code == 200, path
        for method, path in (("GET", "/model"), ("GET", "/docs.json"), ("GET", "/cases/ISIC_0024306.jpg"),
                             ("POST", "/classify"), ("POST", "/classify_batch"), ("POST", "/similar"),
                             ("POST", "/gradcam"), ("POST", "/infer"), ("POST", "/dispute")):  # fmt: skip
            r = c.request(method, path, files={"image": _jpeg()} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["field"] == "authorization" and "Authorization: Bearer" in r.json()["error"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post("/classify", files={"image": _jpeg()}, headers=_bearer("lf_not-a-token"))
        assert wrong.status_code == 401
        ok = c.post("/classify", files={"image": _jpeg()}, headers=_bearer(token))
        assert ok.status_code == 200 and ok.json()["p_malignant"] is not None
        spec = c.get("/docs.json", headers=_bearer(token)).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert (
            spec["paths"]["/livez"]["get"]["security"] == []
            and "401" in spec["paths"]["/classify"]["post"]["responses"]
        )


def test_a_revoked_token_is_refused_within_seconds_without_a_restart(secured, tmp_path):
    base, _, tokens = secured
    temporary = auth.add(tokens, "visitor")
    with httpx.Client(base_url=base, timeout=60) as c:

        def status_becomes(expected: int, what: str) -> None:
            deadline = time.monotonic() + 10
            while c.get("/model", headers=_bearer(temporary)).status_code != expected:
                assert time.monotonic() < deadline, what
                time.sleep(0.2)

        status_becomes(200, "a new token does not work after 10 s")
        auth.revoke(tokens, "visitor")
        status_becomes(401, "a revoked token still works after 10 s")
        assert c.get("/model", headers=_bearer(temporary)).status_code == 401


# ----------------------------------------------------------------------------------------------
# headers, request ids, bad values, metric labels


def test_every_response_has_security_headers_and_a_request_id(secured):
    base, token, _ = secured
    with httpx.Client(base_url=base, timeout=60) as c:
        responses = [c.get("/"), c.get("/model"), c.get("/nowhere", headers=_bearer(token))]
        responses.append(c.post("/classify", files={"image": _jpeg()}, headers=_bearer(token)))
    for r in responses:
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer" and len(r.headers["x-request-id"]) == 32
    answer = responses[-1]
    assert answer.json()["request_id"] == answer.headers["x-request-id"]
    assert len({r.headers["x-request-id"] for r in responses}) == len(responses)


@pytest.mark.parametrize(
    "where, value",
    [
        ("similar", "²"),  # a non-ASCII digit (was a 500)
        ("similar", "7" * 5000),
        ("similar", "-1"),
        ("similar", "0x10"),
        ("age", "٣٠"),  # Arabic-Indic digits
        ("age", "1" * 5000),
        ("age", "1_0"),
        ("age", "nan"),
    ],
)
def test_odd_values_get_a_422_naming_the_field(secured, where, value):
    base, token, _ = secured
    params = {"similar": value} if where == "similar" else None
    data = {"age": value} if where == "age" else None
    r = httpx.post(f"{base}/classify", params=params, data=data, files={"image": _jpeg()}, headers=_bearer(token))
    assert r.status_code == 422 and r.json()["field"] == where, r.text


def test_metrics_are_labelled_by_route_whatever_the_paths(secured):
    base, token, _ = secured
    with httpx.Client(base_url=base, timeout=60) as c:
        c.get("/cases/warmup.jpg", headers=_bearer(token))
        before = c.get("/metrics").text
        for i in range(50):
            c.get(f"/cases/x{i}.jpg", headers=_bearer(token))
            c.get(f"/x{i}", headers=_bearer(token))
        after = c.get("/metrics").text
    assert not any(f"x{i}" in after for i in range(50)), "a client's path became a label"
    grown = len(after.splitlines()) - len(before.splitlines())
    assert grown <= 60, f"/metrics grew by {grown} lines for 100 requests to 2 routes"
    assert 'endpoint="/cases/{image_id}.jpg"' in after and 'endpoint="other"' in after


# ----------------------------------------------------------------------------------------------
# bounded memory and admission


def _declared_only(base: str, path: str, length: int, token: str) -> int:
    """The status of a request that declares ``length`` bytes of body and sends none (a client
    cannot be made to by httpx): the server must answer without waiting for them."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: image/png\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.serial  # its peak RSS depends on how many requests overlap: another test on the cores changes that
def test_a_hostile_corpus_gets_its_answers_within_bounded_memory(secured):
    """Few-KB PNGs declaring 48 MP to every image route, a full batch of them, a batch within the
    pixel budget, the largest /infer body allowed and one over it, declared lengths far over the
    limits: the right status for each, and the worker's RSS never more than 300 MB over idle."""
    base, token, _ = secured
    auth_h = _bearer(token)
    big = _blank_png()
    small = _jpeg()
    infer_over = b'{"items": [' + b" " * MAX_INFER_BYTES + b"]}"
    infer_full = _infer_body(MAX_INFER_ITEMS)  # the most items one request may carry
    cases = [
        ("/classify", {"files": {"image": ("big.png", big, "image/png")}}, {200}),
        ("/gradcam", {"files": {"image": ("big.png", big, "image/png")}}, {200}),
        ("/classify", {"content": big, "headers": {"content-type": "image/png"}}, {200}),
        ("/classify_batch", {"files": [("image", ("b.png", big, "image/png"))] * 16}, {413}),
        ("/classify_batch", {"files": [("image", ("b.png", big, "image/png")), ("image", small)]}, {200}),
        ("/infer", {"content": infer_over, "headers": {"content-type": "application/json"}}, {413}),
        ("/infer", {"content": infer_full, "headers": {"content-type": "application/json"}}, {200}),
    ]
    with httpx.Client(base_url=base, timeout=120) as c:
        assert c.post("/classify", files={"image": small}, headers=auth_h).status_code == 200  # warm
        time.sleep(1.0)
        worker = server_processes(base)["worker"][0]
        idle, peak, stop = _rss(worker), [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(worker))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()

        def send(case) -> tuple[str, int, set]:
            path, kwargs, expected = case
            headers = {**auth_h, **kwargs.pop("headers", {})}
            try:
                status = c.post(path, headers=headers, **kwargs).status_code
            except httpx.HTTPError:  # the server may close a connection it refused
                status = 413
            return path, status, expected

        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(send, [(p, dict(k), e) for _ in range(3) for p, k, e in cases]))
        finally:
            stop.set()
            watcher.join()
    for path, status, expected in results:
        assert status in expected | {503}, (path, status)  # 503: busy, retry (bounded waiting)
    for path in ("/classify", "/infer"):  # a body declared far over the limit: refused before it is sent
        assert _declared_only(base, path, 10**12, token) == 413
    assert sum(s == 200 for _, s, e in results if 200 in e) >= 6, results
    rise = peak[0] - idle
    assert rise <= RSS_RISE_LIMIT, f"worker RSS rose {rise / 2**20:.0f} MB over idle ({idle / 2**20:.0f} MB)"


def test_infer_takes_a_bounded_number_of_items_and_names_the_limit(secured):
    """/infer: the most items allowed are answered item by item; one more, or a body of many tiny
    items (within the byte limit), is a 413 naming ``items`` before BentoML parses it."""
    base, token, _ = secured
    headers = {**_bearer(token), "content-type": "application/json"}
    with httpx.Client(base_url=base, timeout=120) as c:
        ok = c.post("/infer", content=_infer_body(MAX_INFER_ITEMS), headers=headers)
        assert ok.status_code == 200 and len(ok.json()) == MAX_INFER_ITEMS
        for body in (
            _infer_body(MAX_INFER_ITEMS + 1),
            b'{"items": [' + b",".join([b'{"pixels": ""}'] * 100_000) + b"]}",
        ):
            r = c.post("/infer", content=body, headers=headers)
            assert r.status_code == 413 and r.json()["field"] == "items", r.text
            assert f"limit of {MAX_INFER_ITEMS}" in r.json()["error"]


def _gradcam_process(base: str) -> psutil.Process:
    """The worker's Grad-CAM process (pipeline.serving.explainer), once started."""
    worker = psutil.Process(server_processes(base)["worker"][0])
    found = [p for p in worker.children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(found) == 1, [p.cmdline() for p in worker.children()]
    return found[0]


def test_gradcam_has_a_process_at_the_lowest_priority_and_a_new_one_when_it_dies(secured):
    """Grad-CAM is computed in a child of the worker in Linux's SCHED_IDLE class (only CPU nothing
    else wants); killed (as the OOM killer would), it costs at most one 503 with Retry-After and
    the next request is answered by a new one."""
    base, token, _ = secured
    headers, image = _bearer(token), _jpeg()
    with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
        assert c.post("/gradcam", files={"image": image}).status_code == 200
        child = _gradcam_process(base)
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        child.kill()
        child.wait(10)
        answers = [c.post("/gradcam", files={"image": image}) for _ in range(2)]
        codes = [r.status_code for r in answers]
        assert codes in ([200, 200], [503, 200]), [r.text for r in answers]
        if codes[0] == 503:
            assert answers[0].headers["retry-after"] and "Grad-CAM process ended" in answers[0].json()["error"]
        assert _gradcam_process(base).pid != child.pid
        assert c.get("/model").json()["admission"]["gradcam_restarts"] >= codes.count(503)


@pytest.mark.serial  # compares two latencies: another test on the cores in between would decide it
def test_gradcam_bursts_do_not_stall_classification(secured):
    """40 concurrent /gradcam callers (Grad-CAM has a lane of its own, a short queue, then a 503
    answered before BentoML's middleware; the overlay is computed in a process of its own at the
    lowest priority): the p99 of /classify under that load stays within twice its unloaded value.
    The callers run in a process of their own (tests/gradcam_callers.py), as clients on other
    machines would; refusals are counted on /metrics."""
    base, token, _ = secured
    headers = _bearer(token)
    image = _jpeg()

    def latencies(n: int) -> list[float]:
        out = []
        with httpx.Client(base_url=base, timeout=120) as c:
            for _ in range(n):
                t = time.perf_counter()
                assert c.post("/classify", files={"image": image}, headers=headers).status_code == 200
                out.append(time.perf_counter() - t)
        return out

    latencies(10)  # warm
    # unloaded and loaded in turns, 300 requests each in all: a p99 of fewer is one or two
    # scheduler hiccups on 2 cores, and turns keep a slow minute of the machine out of one side only
    command = [sys.executable, "-m", "tests.gradcam_callers", base, token, str(real_images(1)[0]), "40"]
    unloaded, loaded, statuses = [], [], collections.Counter()
    for _ in range(3):
        unloaded += latencies(100)
        callers = subprocess.Popen(command, cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert callers.stdout.readline().strip() == "started"
            time.sleep(1.0)
            loaded += latencies(100)
        finally:
            out, _ = callers.communicate("", timeout=120)
        statuses.update(json.loads(out))
    unloaded, loaded = float(np.percentile(unloaded, 99)), float(np.percentile(loaded, 99))
    assert set(statuses) <= {"200", "503"} and statuses["200"] and statuses["503"], statuses
    assert loaded <= 2 * unloaded, (
        f"/classify p99 {loaded * 1000:.0f} ms under Grad-CAM load vs {unloaded * 1000:.0f} ms"
    )
    info = httpx.get(f"{base}/model", headers=headers).json()
    assert info["admission"]["gradcam_refused"] >= statuses["503"]
    metrics = httpx.get(f"{base}/metrics").text
    refused = re.search(r'lesionflow_requests_refused_total\{route="/gradcam",status="503"\} (\S+)', metrics)
    assert refused and float(refused.group(1)) >= statuses["503"], metrics[-2000:]
