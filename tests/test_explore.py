"""The explorer's server (vaelab/app/explore.py) without a browser: every operation on every kind of
model, and hostile requests (malformed, oversized, out of range, odd paths) answered with a 4xx and
a one-line message, never a 500 or a traceback. The browser tests are in tests/test_browser.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vaelab
from vaelab.app.explore import MAX_BODY, BadRequest, Explorer, make_app, read_body

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its test client; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of each kind: VAE (4-D), label CVAE, left-half CVAE, random-patches CVAE, regressor, and
    a two-layer VAE with a VampPrior."""
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("explore")
    data = write_mnist(root / "data" / "mnist").parent
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False),
        model=vaelab.ModelConfig(latent_dim=4, hidden=(32,)),
        train=vaelab.TrainConfig(epochs=1, batch_size=32, progress=False, threads=1, device="cpu", lr=3e-3),
    )
    kinds = {"vae": {}, "label": {"model": "cvae", "condition": "label"},
             "half": {"model": "cvae", "condition": "left-half"},
             "patches": {"model": "cvae", "condition": "random-patches"},
             "reg": {"model": "regressor", "condition": "left-half"},
             "vamp2": {"layers": 2, "prior": "vamp", "prior_components": 5}}
    out = {}
    for name, kw in kinds.items():
        cfg = base.replace(model=replace(base.model, **kw))
        out[name] = vaelab.train(cfg, root / name).run_dir
    return out


@pytest.fixture(scope="module")
def clients(runs):
    return {name: TestClient(make_app(Explorer.open(run)), raise_server_exceptions=False)
            for name, run in runs.items()}


def _png_b64(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _png(resp) -> Image.Image:
    return Image.open(io.BytesIO(resp.content))


def test_every_operation_on_every_kind_of_model(clients):
    c = clients["vae"]
    info = c.get("/api/info").json()
    assert info["top"] == 4 and info["condition"] == "none" and info["tests"] == 60
    r = c.post("/api/decode", json={"z": [0.0, 1.0, -1.0, 2.0]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = _png(r)
    assert im.size == (28, 28) and im.text["picture"] == "decoded z" and im.text["epoch"] == "1"
    r2 = c.post("/api/decode", json={"z": [0.0, 1.0, -1.0, -2.0]})
    assert r2.content != r.content  # another z, another picture
    drawing = np.zeros((100, 100), np.uint8)
    drawing[40:60, 10:90] = 255
    enc = c.post("/api/encode", json={"image": "data:image/png;base64," + _png_b64(drawing), "samples": 3}).json()
    assert len(enc["mean"]) == 4 and len(enc["std"]) == 4 and len(enc["samples"]) == 3
    assert enc["reconstruction"].startswith("data:image/png;base64,")
    frames = c.post("/api/interpolate", json={"a": 0, "b": 5, "steps": 6}).json()["frames"]
    assert len(frames) == 6 and frames[0] != frames[-1]
    assert c.post("/api/samples", json={"n": 8, "seed": 1}).status_code == 200
    tests = c.get("/api/tests?start=58&count=10").json()
    assert tests["total"] == 60 and len(tests["images"]) == 2 and len(tests["labels"]) == 2

    lab = clients["label"]
    a = lab.post("/api/decode", json={"z": [0.5] * 4, "label": 1}).content
    b = lab.post("/api/decode", json={"z": [0.5] * 4, "label": 8}).content
    assert a != b
    assert lab.post("/api/samples", json={"label": 3, "n": 4}).status_code == 200
    assert lab.post("/api/complete", json={"test": 0}).status_code == 409

    for name in ("half", "patches", "reg"):
        m = clients[name]
        mask = np.full((224, 224), 255, np.uint8)
        mask[:, 112:] = 0  # hide the right half
        out = m.post("/api/complete", json={"test": 3, "samples": 4, "mask": _png_b64(mask)}).json()
        assert len(out["completions"]) == 4 and out["observed"].startswith("data:image/png")
        assert out["visible"] == 28 * 14  # the left half: the model's own region, or all pixels less the hidden half
    info = clients["half"].get("/api/info").json()
    assert info["region_mask"].startswith("data:image/png") and not info["include_mask"]
    assert clients["reg"].get("/api/info").json()["top"] == 0
    r = clients["reg"].post("/api/decode", json={"z": []})
    assert r.status_code == 409 and "no latent variables" in r.json()["error"]


def _refused(resp, status: int, words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    msg = resp.json()["error"]
    assert words in msg and "Traceback" not in resp.text and "\n" not in msg


def test_malformed_requests_get_4xx_with_a_message(clients):
    c = clients["vae"]
    _refused(c.post("/api/decode", content=b"{not json", headers={"content-type": "application/json"}), 400,
             "not valid JSON")
    _refused(c.post("/api/decode", content=b"[1, 2]", headers={"content-type": "application/json"}), 400,
             "JSON object")
    _refused(c.post("/api/decode", content=b"z=1", headers={"content-type": "text/plain"}), 415, "application/json")
    _refused(c.post("/api/decode", json={"z": [0, 0, 0]}), 400, "has 3 values, this model's top latent layer has 4")
    _refused(c.post("/api/decode", json={"z": "0,0,0,0"}), 400, "list of 4 numbers")
    _refused(c.post("/api/decode", json={"z": [0, 0, True, 0]}), 400, "z[2] is not a number")
    _refused(c.post("/api/decode", json={"z": [0, 0, 1e300, 0]}), 400, "must be finite")
    for bad in (b'{"z": [NaN, 0, 0, 0]}', b'{"z": [Infinity, 0, 0, 0]}', b'{"z": [1e999, 0, 0, 0]}'):
        resp = c.post("/api/decode", content=bad, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "Traceback" not in resp.text, bad
    _refused(c.post("/api/decode", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400, "JSON")
    _refused(c.post("/api/interpolate", json={"a": 0, "b": 60}), 400, "'b' = 60 is out of range 0..59")
    _refused(c.post("/api/interpolate", json={"a": 0, "b": 1, "steps": 10_000}), 400, "'steps'")
    _refused(c.post("/api/interpolate", json={"a": -1, "b": 1}), 400, "'a'")
    _refused(c.post("/api/samples", json={"n": 0}), 400, "'n'")
    _refused(c.post("/api/samples", json={"temperature": "hot"}), 400, "'temperature'")
    _refused(c.post("/api/encode", json={"test": 10**12}), 400, "'test'")
    _refused(c.get("/api/tests?start=-1"), 400, "'start'")
    _refused(c.get("/api/tests?count=100000"), 400, "'count'")
    _refused(c.get("/api/tests?start=1e3"), 400, "'start'")
    _refused(clients["label"].post("/api/decode", json={"z": [0] * 4, "label": 10}), 400, "'label' = 10")
    _refused(clients["label"].post("/api/decode", json={"z": [0] * 4, "label": 1.5}), 400, "'label'")


def test_images_are_checked_for_type_size_and_content(clients):
    c = clients["vae"]
    _refused(c.post("/api/encode", json={"image": "%%%"}), 400, "not valid base64")
    _refused(c.post("/api/encode", json={"image": base64.b64encode(b"hello world").decode()}), 400,
             "not a readable image")
    _refused(c.post("/api/encode", json={"image": 7}), 400, "base64 string")
    _refused(c.post("/api/encode", json={"image": "data:text/html;base64,PGI+"}), 400, "data:image")
    tiff = _png_b64(np.zeros((8, 8), np.uint8), "TIFF")
    _refused(c.post("/api/encode", json={"image": tiff}), 415, "TIFF images are not accepted")
    # a 5000 x 5000 PNG is a few KB on the wire: refused from its header, before decoding 25 M pixels
    big = _png_b64(np.zeros((5000, 5000), np.uint8))
    assert len(big) < MAX_BODY
    _refused(c.post("/api/encode", json={"image": big}), 413, "5000x5000 image is too large")
    png = base64.b64decode(_png_b64(np.zeros((28, 28), np.uint8)))
    _refused(c.post("/api/encode", json={"image": base64.b64encode(png[:40]).decode()}), 400, "not a readable image")
    # colour, alpha and odd sizes are converted to the model's 1x28x28
    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    assert c.post("/api/encode", json={"image": _png_b64(rgba, mode="RGBA")}).status_code == 200
    jpeg = _png_b64(np.full((64, 64, 3), 200, np.uint8), "JPEG")
    assert c.post("/api/encode", json={"image": jpeg, "invert": True}).status_code == 200
    _refused(clients["half"].post("/api/complete", json={"test": 0, "mask": "nope"}), 400, "'mask'")


def test_oversized_bodies_are_refused(clients):
    c = clients["vae"]
    huge = b'{"z": [' + b"0," * MAX_BODY + b"0]}"
    _refused(c.post("/api/decode", content=huge, headers={"content-type": "application/json"}), 413, "limit")

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(4 * MAX_BODY // 65536):
            yield b" " * 65536

    _refused(c.post("/api/decode", content=chunks(), headers={"content-type": "application/json"}), 413, "limit")
    _refused(c.post("/api/decode", content=b"{}", headers={"content-type": "application/json",
                                                         "content-length": "abc"}), 400, "Content-Length")


def test_the_body_limit_is_enforced_while_reading():
    """read_body stops at the first chunk past the limit: the rest of the stream is never read."""
    consumed = []

    class FakeRequest:
        headers: dict[str, str] = {}

        async def stream(self):
            for i in range(1000):
                consumed.append(i)
                yield b"x" * 1000

    with pytest.raises(BadRequest) as e:
        asyncio.run(read_body(FakeRequest(), limit=10_000))
    assert e.value.status == 413 and len(consumed) == 11


def test_only_fixed_routes_are_served(clients, runs):
    c = clients["vae"]
    (runs["vae"] / "secret.txt").write_text("not for the web")
    for path in ("/secret.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/static/../config.json",
                 "/config.json", "/checkpoints/best.safetensors", "/explore.js/..%2f..%2fsecret.txt",
                 "/..%2f..%2f..%2fetc%2fpasswd", "/api/../config.json"):
        r = c.get(path)
        assert r.status_code == 404 and "not for the web" not in r.text, path
        assert r.json() == {"error": "Not Found"}
    assert c.get("/api/decode").status_code == 405
    assert c.delete("/").status_code == 405
    page = c.get("/")
    assert page.status_code == 200 and "<canvas id=\"pad\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert c.get("/explore.js").headers["content-type"].startswith("text/javascript")


def test_local_serving_refuses_foreign_host_headers(runs):
    app = make_app(Explorer.open(runs["vae"]), allowed_hosts=["127.0.0.1", "localhost"])
    c = TestClient(app, base_url="http://127.0.0.1")
    assert c.get("/api/info").status_code == 200
    assert c.get("/api/info", headers={"host": "evil.example"}).status_code == 400


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                         lambda ch: st.lists(ch, max_size=5) | st.dictionaries(
                             st.sampled_from(["z", "label", "a", "b", "steps", "image", "test", "n", "mask",
                                              "samples", "seed", "observe", "temperature", "invert"]), ch, max_size=5),
                         max_leaves=12),
       route=st.sampled_from(["decode", "encode", "interpolate", "samples", "complete"]),
       kind=st.sampled_from(["vae", "label", "half", "reg"]))
def test_no_request_body_makes_a_500(clients, body, route, kind):
    r = clients[kind].post(f"/api/{route}", content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert "error" in r.json() and "Traceback" not in r.text


def test_the_cli_refuses_a_bad_port_and_a_taken_one(runs, capsys):
    import socket

    from vaelab.cli import main

    assert main(["explore", str(runs["vae"]), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["explore", str(runs["vae"]), "--port", str(s.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        s.close()


def test_the_listening_socket_gets_tcp_nodelay_connections():
    """asyncio sets TCP_NODELAY only on sockets of protocol IPPROTO_TCP; with proto 0 every keep-alive
    decode waited ~40 ms for a delayed ACK (benchmarks/explorer_latency.py: 52 ms -> 7 ms median)."""
    import socket

    from vaelab.app.explore import _bind

    s = _bind("127.0.0.1", 0)
    try:
        assert s.proto == socket.IPPROTO_TCP
    finally:
        s.close()


def test_the_pad_and_random_draws_follow_the_models_own_prior(clients, runs):
    from vaelab.viz.generate import prior_spread

    std = clients["vae"].get("/api/info").json()
    assert std["prior"] == "standard" and std["range"] == 3.0  # N(0, I): 3 standard deviations
    info = clients["vamp2"].get("/api/info").json()
    assert info["prior"] == "vamp" and info["latent_dims"] == [4, 2] and info["top"] == 2
    mu, sd = prior_spread(vaelab.load_run(runs["vamp2"], device="cpu").model)
    assert info["range"] >= float((mu.abs() + 3 * sd).max()) - 0.2 and (2 * info["range"]) % 1 == 0
    a = clients["vamp2"].post("/api/prior", json={"seed": 3}).json()["z"]
    b = clients["vamp2"].post("/api/prior", json={"seed": 3}).json()["z"]
    c = clients["vamp2"].post("/api/prior", json={"seed": 4}).json()["z"]
    assert len(a) == 2 and a == b and a != c
    assert clients["vamp2"].post("/api/prior", json={"seed": -1}).status_code == 400
    assert clients["reg"].post("/api/prior", json={}).status_code in (400, 409)  # no latent variables


def _silence_first_two_dims(model) -> None:
    """Make the posterior mean of z[0] and z[1] constant: the encoder's last linear layer outputs
    (mu, logvar); its mu rows 0 and 1 zeroed, those dimensions carry no information about X."""
    last = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight[:2] = 0.0
        last.bias[:2] = 0.0


def test_the_pad_starts_on_the_two_most_active_dimensions(runs):
    ex = Explorer.open(runs["vae"], device="cpu")
    _silence_first_two_dims(ex.model)
    client = TestClient(make_app(ex), raise_server_exceptions=False)
    info = client.get("/api/info").json()
    # the variance of the posterior mean over the test images, computed here by hand
    run = vaelab.load_run(runs["vae"], device="cpu")
    _silence_first_two_dims(run.model)
    x = run.data("test").images.float() / 255
    with torch.no_grad():
        var = run.model.encode(x)[-1].mean.var(0)
    assert float(var[:2].max()) < 1e-10  # z[0], z[1]: nothing
    assert info["pad_dims"] == sorted(int(i) for i in var.argsort(descending=True)[:2])
    assert info["activity_images"] == 60
    # a label CVAE too (the condition goes with the images); a 2-D top layer starts on both dimensions
    lab = TestClient(make_app(Explorer.open(runs["label"])), raise_server_exceptions=False)
    pad = lab.get("/api/info").json()["pad_dims"]
    assert len(pad) == 2 and pad[0] != pad[1] and all(0 <= d < 4 for d in pad)
    assert TestClient(make_app(Explorer.open(runs["vamp2"]))).get("/api/info").json()["pad_dims"] == [0, 1]


def test_numbers_past_pythons_digit_limit_or_not_ascii_are_400s_not_500s(clients):
    """A 5,000-digit integer (past Python's int-string conversion limit), a 400-digit one (past what a
    float holds), and digits that are not ASCII ("²".isdigit() is true but int() refuses it) are each
    a 400 with a one-line message, in a JSON body, in a query string and in Content-Length."""
    c = clients["vae"]
    huge, big = "9" * 5000, "9" * 400
    js = {"content-type": "application/json"}
    for body in (f'{{"z": [{huge}, 0, 0, 0]}}', f'{{"z": [0, 0, 0, 0], "seed": {huge}}}',
                 f'{{"z": [{big}, 0, 0, 0]}}', f'{{"z": [-{big}, 0, 0, 0]}}'):
        _refused(c.post("/api/decode", content=body.encode(), headers=js), 400, "")
    for route, body in (("samples", f'{{"temperature": {big}}}'), ("samples", f'{{"n": {huge}}}'),
                        ("interpolate", f'{{"a": {huge}, "b": 0}}'), ("encode", f'{{"test": {big}}}'),
                        ("prior", f'{{"seed": {big}}}'), ("samples", f'{{"temperature": 1{"0" * 400}.5}}')):
        _refused(c.post(f"/api/{route}", content=body.encode(), headers=js), 400, "")
    _refused(c.post("/api/decode", content=f'{{"z": [0, 0, 0, 0], "seed": {huge}}}'.encode(), headers=js), 400,
             "digits")
    for q in ("start=%C2%B2", "count=%C2%B2", "start=%D9%A3", "start=" + huge, "count=" + big, "start=+1",
              "start=%201", "start="):
        _refused(c.get(f"/api/tests?{q}"), 400, "'start'" if q.startswith("start") else "'count'")
    for length in ("²", huge, "+2", "2 "):
        _refused(c.post("/api/decode", content=b"{}", headers={**js, "content-length": length.encode("latin-1")}), 400,
                 "Content-Length")


def test_uploads_decoded_at_once_are_bounded_by_a_pixel_budget(clients, monkeypatch):
    """Past DECODE_BUDGET pixels being decoded across requests, an upload is answered 503 (not queued,
    not decoded); the budget is given back after every request, failed ones included."""
    from vaelab.app import explore

    c = clients["vae"]
    monkeypatch.setattr(explore, "DECODE_BUDGET", 50 * 50)
    small, big = _png_b64(np.zeros((40, 40), np.uint8)), _png_b64(np.zeros((60, 60), np.uint8))
    assert c.post("/api/encode", json={"image": small}).status_code == 200
    _refused(c.post("/api/encode", json={"image": big}), 503, "try again")
    held = explore._decoding.acquire(1000)  # another request decoding a 1000-pixel image right now
    try:
        _refused(c.post("/api/encode", json={"image": small}), 503, "try again")
        _refused(clients["half"].post("/api/complete", json={"image": small}), 503, "try again")
    finally:
        explore._decoding.release(held)
    bad = base64.b64encode(base64.b64decode(small)[:40]).decode()  # header fine, pixel data cut short
    _refused(c.post("/api/encode", json={"image": bad}), 400, "not a readable image")
    assert explore._decoding.in_flight == 0
    assert c.post("/api/encode", json={"image": small}).status_code == 200


# ---------------------------------------------------------------- slow clients (issue 25)
@pytest.fixture
def live(runs):
    """The explorer's own server (vaelab.app.explore.server_config) on a free port, in a thread."""
    import threading
    import time

    import uvicorn

    from vaelab.app.explore import _bind, server_config

    started = []

    def start(header_timeout: float = 10.0) -> int:
        sock = _bind("127.0.0.1", 0)
        server = uvicorn.Server(server_config(make_app(Explorer.open(runs["vae"])), header_timeout))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread, sock))
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return sock.getsockname()[1]

    yield start
    for server, thread, sock in started:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _slow_socket(port: int, data: bytes):
    import socket

    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    return s


def _closed_within(s, seconds: float) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within ``seconds``."""

    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _get(port: int, path: str = "/api/info") -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status


def test_connections_that_never_finish_their_headers_do_not_lock_the_user_out(live):
    """70 connections that send half a request head and wait: before, they filled uvicorn's 64
    connection slots and every request got 503; now one client keeps at most 8 such connections
    (a new one closes its oldest), and the user's request is answered at once."""
    port = live()
    slow = [_slow_socket(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(70)]
    try:
        assert _get(port) == 200
        closed = sum(_closed_within(s, 0.2) for s in slow)
        assert closed >= 70 - 8, closed
    finally:
        for s in slow:
            s.close()


def test_a_connection_that_stalls_its_headers_is_closed_after_the_header_timeout(live):
    import time

    port = live(header_timeout=0.5)
    s = _slow_socket(port, b"GET /api/info HTTP/1.1\r\nHost: 12")
    t0 = time.monotonic()
    try:
        assert _closed_within(s, 5.0) and time.monotonic() - t0 < 3.0
    finally:
        s.close()
    assert _get(port) == 200  # a request that sends its head at once is not affected


def test_a_stalled_request_body_is_answered_408(live, monkeypatch):
    import vaelab.app.explore as explore

    monkeypatch.setattr(explore, "BODY_TIMEOUT", 0.5)
    port = live()
    s = _slow_socket(port, b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"z\": [0")
    head = b""
    try:
        s.settimeout(5.0)
        while b"stalled" not in head:  # the head and the body may come in separate packets
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    finally:
        s.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert b"stalled" in head
