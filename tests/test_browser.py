"""The explorer and the report in a real browser: Debian's Chromium driven by Playwright for Python
(never `playwright install`; .ci/run installs the `chromium` package). The explorer is started with
the command line (`vaelab explore RUN --port 0`) against tiny trained models; the tests move the pad
and a slider and check the decoded image changes, upload an image and check its reconstruction
appears, run a completion on a CVAE, open the report and check every image loads with no console
error. Screenshots go to the test's tmp dir (and to $VAELAB_SHOTS when set)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vaelab

CHROMIUM = os.environ.get("VAELAB_CHROMIUM", "/usr/bin/chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright (Python) is not installed: pip install -e .[test]"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"),
]
SRC = str(Path(vaelab.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import write_mnist

    root = tmp_path_factory.mktemp("browser")
    data = write_mnist(root / "data" / "mnist").parent
    base = vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data), val_size=40, download=False),
        model=vaelab.ModelConfig(latent_dim=4, hidden=(32,)),
        train=vaelab.TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu", lr=3e-3),
    )
    out = {}
    for name, kw in {"vae": {}, "cvae": {"model": "cvae", "condition": "left-half"},
                     "wide": {"latent_dim": 24}}.items():
        out[name] = vaelab.train(base.replace(model=replace(base.model, **kw)), root / name).run_dir
    _silence_first_two_dims(out["wide"] / "checkpoints" / "best.safetensors")
    return out


def _silence_first_two_dims(path: Path) -> None:
    """Rewrite a one-hidden-layer VAE's checkpoint so that the posterior mean of z[0] and z[1] is the
    same for every image (their rows of the encoder's (mu, logvar) output layer zeroed): the two
    dimensions a pad starting on z[0] x z[1] would show carry no information."""
    from vaelab.runs.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(path)
    two_l = 2 * ck.config.model.latent_dim
    (w,) = [k for k, v in ck.model.items() if k.startswith("encoder.") and k.endswith(".weight") and v.shape[0] == two_l]
    ck.model[w][:2] = 0.0
    ck.model[w[: -len("weight")] + "bias"][:2] = 0.0
    save_checkpoint(path, ck)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("VAELAB_SHOTS"):
        Path(os.environ["VAELAB_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["VAELAB_SHOTS"]) / path.name)
    return path


class Server:
    """``vaelab explore RUN --port 0`` in a subprocess; ``url`` from the line it prints."""

    def __init__(self, run: Path) -> None:
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "vaelab", "explore", str(run), "--port", "0",
                                      "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"no address printed: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = m.group(1)

    def close(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    pg.errors = []  # console errors and uncaught exceptions
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def _wait(page, expr: str, timeout: float = 10.0) -> None:
    """Poll a JavaScript expression until it is true (page.wait_for_function evaluates its predicate
    with eval, which the explorer's Content-Security-Policy forbids, rightly)."""
    import time

    end = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expr})"):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expr}; status: {page.inner_text('#status')!r}")
        page.wait_for_timeout(30)


def _src(page, sel: str) -> str:
    return page.eval_on_selector(sel, "e => e.src")


def _loaded(page, sel: str) -> bool:
    return page.eval_on_selector_all(sel, "es => es.length > 0 && es.every(e => e.complete && e.naturalWidth > 0)")



def _stroke(page, canvas: str, start: tuple[int, int], end: tuple[int, int], steps: int) -> None:
    """One mouse stroke on ``canvas`` from ``start`` to ``end`` (pixels from its top-left corner)."""
    page.locator(canvas).scroll_into_view_if_needed()
    box = page.locator(canvas).bounding_box()
    page.mouse.move(box["x"] + start[0], box["y"] + start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=steps)
    page.mouse.up()

def test_explorer_pad_slider_and_upload(runs, page, tmp_path):
    srv = Server(runs["vae"])
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)
        first = _src(page, "#decoded")
        assert first.startswith("data:image/png;base64,") and _loaded(page, "#decoded")
        assert "checkpoint best.safetensors" in page.inner_text("#info")
        _shot(page, tmp_path, "explore-start")

        # drag on the pad: its two dimensions move and the decoded image changes
        dx, dy = int(page.input_value("#dimx")), int(page.input_value("#dimy"))
        other = min({0, 1, 2, 3} - {dx, dy})
        box = page.locator("#pad").bounding_box()
        decodes = int(page.get_attribute("body", "data-decodes"))
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.05, steps=5)
        page.mouse.up()
        _wait(page, f"Number(document.body.dataset.decodes) > {decodes}")
        _wait(page, f"document.getElementById('decoded').src !== {first!r}")
        moved = _src(page, "#decoded")
        assert float(page.inner_text(f"#zval{dx}")) > 2.5 and float(page.inner_text(f"#zval{dy}")) > 2.5
        # a slider of another dimension: the image changes again
        page.eval_on_selector(f"input.zslider[data-dim='{other}']",
                              "e => { e.value = -2.5; e.dispatchEvent(new Event('input', {bubbles: true})); }")
        _wait(page, f"document.getElementById('decoded').src !== {moved!r}")
        assert page.inner_text(f"#zval{other}") == "-2.50"
        assert page.is_disabled(f"input.zslider[data-dim='{dx}']")  # on the pad, not a slider
        _shot(page, tmp_path, "explore-moved")

        # upload an image: its reconstruction and samples from Q(z|X) appear
        arr = np.zeros((64, 64), np.uint8)
        arr[20:28, 6:58] = 255
        up = tmp_path / "bar.png"
        Image.fromarray(arr).save(up)
        page.set_input_files("#upload", str(up))
        page.wait_for_selector("body[data-encoded='1']", timeout=10_000)
        assert _src(page, "#enc-rec").startswith("data:image/png;base64,") and _loaded(page, "#enc-rec")
        assert _loaded(page, "#enc-samples img") and page.locator("#enc-samples img").count() == 8
        assert page.inner_text("#enc-mean").count("z[") == 4
        # explore from the posterior mean: the pad takes it and decodes it
        before = _src(page, "#decoded")
        page.click("#use-mean")
        _wait(page, f"document.getElementById('decoded').src !== {before!r}")

        # draw on the canvas: encoded again when the stroke ends
        _stroke(page, "#draw", (30, 100), (190, 110), steps=6)
        page.wait_for_selector("body[data-encoded='2']", timeout=10_000)

        # interpolation between test images 0 and 3
        page.click("#thumbs img[data-index='0']")
        page.click("#thumbs img[data-index='3']")
        page.click("#interp")
        _wait(page, "document.querySelectorAll('#strip img').length === 10")
        assert _loaded(page, "#strip img") and _loaded(page, "#frame")
        f0 = _src(page, "#frame")
        page.eval_on_selector("#walk", "e => { e.value = 9; e.dispatchEvent(new Event('input')); }")
        assert _src(page, "#frame") != f0
        _shot(page, tmp_path, "explore-encoded")
        assert page.inner_text("#status") in ("", "encoded")
        assert not page.errors, page.errors
    finally:
        err = srv.close()
    assert "Traceback" not in err


def test_explorer_pad_starts_on_active_dims_saves_copies_and_labels_thumbs(runs, browser, tmp_path):
    """A 24-D model whose z[0], z[1] carry nothing: the pad starts on its two most active dimensions,
    all 24 sliders are on the page (no box scrolled inside it), the decoded image downloads as the
    server's PNG, z goes to the clipboard as JSON (or into a text field without one), and the test
    thumbnails show their index and class."""
    import base64
    import json

    run = vaelab.load_run(runs["wide"], device="cpu")
    x = run.data("test").images.float() / 255
    with vaelab.evaluation.eval_mode(run.model):
        var = run.model.encode(x)[-1].mean.detach().var(0)  # (24,) the activity of each unit
    expected = sorted(int(i) for i in var.argsort(descending=True)[:2])
    assert float(var[:2].max()) < 1e-10 and 0 not in expected and 1 not in expected

    ctx = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    srv = Server(runs["wide"])
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)
        assert [int(page.input_value("#dimx")), int(page.input_value("#dimy"))] == expected
        assert f"z[{expected[0]}] and z[{expected[1]}]" in page.inner_text("#pad-why")

        # every slider on the page, none inside a box that scrolls
        assert page.locator("input.zslider").count() == 24
        assert page.eval_on_selector("#sliders", "e => e.scrollHeight <= e.clientHeight + 1 && "
                                     "e.scrollWidth <= e.clientWidth + 1")
        outer = page.locator("#sliders").bounding_box()
        for b in page.eval_on_selector_all("input.zslider", "es => es.map(e => e.getBoundingClientRect().toJSON())"):
            assert b["width"] > 60 and b["height"] > 0
            assert outer["x"] - 1 <= b["x"] and b["x"] + b["width"] <= outer["x"] + outer["width"] + 1
            assert outer["y"] - 1 <= b["y"] and b["y"] + b["height"] <= outer["y"] + outer["height"] + 1
            assert b["x"] + b["width"] <= 1200  # nothing past the window's right edge
        assert page.eval_on_selector("html", "e => e.scrollWidth <= e.clientWidth")  # no sideways scroll

        # move the pad, then save the decoded image: the file is the PNG the server sent, with z in it
        box = page.locator("#pad").bounding_box()
        first = _src(page, "#decoded")
        page.mouse.click(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.3)
        _wait(page, f"document.getElementById('decoded').src !== {first!r}")
        _wait(page, "document.getElementById('save').href === document.getElementById('decoded').src")
        with page.expect_download() as dl:
            page.click("#save")
        saved = Path(dl.value.path()).read_bytes()
        assert dl.value.suggested_filename == "wide-decoded.png"
        assert saved == base64.b64decode(_src(page, "#decoded").split(",", 1)[1])
        im = Image.open(io.BytesIO(saved))
        assert im.size == (28, 28) and im.text["picture"] == "decoded z" and len(im.text["z"].split(",")) == 24

        # copy z: JSON on the clipboard, the pad's values in it
        page.click("#copy-z")
        page.wait_for_selector("body[data-copied='1']")
        z = json.loads(page.evaluate("() => navigator.clipboard.readText()"))
        shown = [float(page.inner_text(f"#zval{i}")) for i in range(24)]
        assert len(z) == 24 and all(abs(a - b) <= 0.006 for a, b in zip(z, shown, strict=True))
        assert z[expected[0]] > 1 and z[expected[1]] > 1 and page.is_hidden("#z-json")
        # no clipboard (a page served over http from another host): the JSON in a selected text field
        page.evaluate("() => Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true})")
        page.click("#copy-z")
        page.wait_for_selector("body[data-copied='2']")
        assert page.is_visible("#z-json") and json.loads(page.input_value("#z-json")) == z
        assert page.evaluate("() => document.activeElement.id") == "z-json"

        # the test thumbnails carry their index and class label
        page.wait_for_selector("#thumbs figure")
        caps = page.eval_on_selector_all("#thumbs figcaption", "es => es.map(e => e.textContent)")
        labels = run.data("test", limit=len(caps)).labels.tolist()
        assert len(caps) == 32 and caps == [f"#{i} · {k}" for i, k in enumerate(labels)]
        assert page.inner_text("#thumbs-key") == "#index · class label"
        for fig in page.eval_on_selector_all("#thumbs figure", "es => es.slice(0, 3).map(e => ["
                                             "e.querySelector('img').getBoundingClientRect().toJSON(), "
                                             "e.querySelector('figcaption').getBoundingClientRect().toJSON()])"):
            img_box, cap_box = fig
            assert cap_box["y"] >= img_box["y"] + img_box["height"] - 1 and cap_box["width"] <= 48  # under it, no wider
        _shot(page, tmp_path, "explore-wide")
        assert not errors, errors
    finally:
        srv.close()
        ctx.close()


def test_explorer_completion_on_a_cvae(runs, page, tmp_path):
    srv = Server(runs["cvae"])
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)
        assert page.is_visible("#complete-panel") and page.is_hidden("#interp-panel")
        page.wait_for_selector("#c-thumbs img")
        page.click("#c-thumbs img[data-index='2']")
        # hide a stroke of the observed (left) half, then ask for 6 completions
        page.click("#c-hide")
        _stroke(page, "#cdraw", (20, 20), (90, 200), steps=5)
        page.click("#complete")
        page.wait_for_selector("body[data-completed='1']", timeout=10_000)
        assert page.locator("#c-out img").count() == 6 and _loaded(page, "#c-out img") and _loaded(page, "#c-observed")
        visible = int(re.search(r"from (\d+) of 784", page.inner_text("#status")).group(1))
        assert 0 < visible < 28 * 14  # the left half less the hidden stroke
        # the pad decodes under the observation of a test image
        first = _src(page, "#decoded")
        page.fill("#pad-observe", "5")
        page.dispatch_event("#pad-observe", "change")
        _wait(page, f"document.getElementById('decoded').src !== {first!r}")
        _shot(page, tmp_path, "explore-completion")
        assert not page.errors, page.errors
    finally:
        srv.close()


def test_report_images_load_without_console_errors(runs, page, tmp_path):
    vaelab.evaluate_run(runs["vae"], k=20, progress=False)
    path = vaelab.app.write_report(runs["vae"])
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    page.goto(path.resolve().as_uri())
    n = page.locator("img").count()
    assert n >= 6 and _loaded(page, "img")
    sizes = page.eval_on_selector_all("img", "es => es.map(e => [e.naturalWidth, e.naturalHeight])")
    assert all(w > 0 and h > 0 for w, h in sizes)
    assert page.locator("ul.health li").count() == 4
    for section in ("health", "config", "curves", "evaluation", "samples", "reconstructions", "interpolation",
                    "kl", "active"):
        assert page.locator(f"section#{section}").count() == 1, section
    # the evaluation's table and note are all on the page: nothing behind a sideways scroll
    assert page.eval_on_selector("section#evaluation pre", "e => e.scrollWidth <= e.clientWidth")
    assert "note:" not in page.inner_text("section#evaluation pre")
    assert page.eval_on_selector("html", "e => e.scrollWidth <= e.clientWidth")
    _shot(page, tmp_path, "report")
    assert not page.errors, page.errors
    # the picture of the training curves is a PNG with its provenance
    src = page.eval_on_selector("section#curves img", "e => e.src")
    import base64

    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert im.format == "PNG" and im.text["picture"] == "training curves from metrics.jsonl"
