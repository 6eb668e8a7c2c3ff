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
    for name, kw in {"vae": {}, "cvae": {"model": "cvae", "condition": "left-half"}}.items():
        out[name] = vaelab.train(base.replace(model=replace(base.model, **kw)), root / name).run_dir
    return out


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

        # drag on the pad: z[0], z[1] move and the decoded image changes
        box = page.locator("#pad").bounding_box()
        decodes = int(page.get_attribute("body", "data-decodes"))
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.05, steps=5)
        page.mouse.up()
        _wait(page, f"Number(document.body.dataset.decodes) > {decodes}")
        _wait(page, f"document.getElementById('decoded').src !== {first!r}")
        moved = _src(page, "#decoded")
        assert float(page.inner_text("#zval0")) > 2.5 and float(page.inner_text("#zval1")) > 2.5
        # a slider of another dimension: the image changes again
        page.eval_on_selector("input.zslider[data-dim='3']",
                              "e => { e.value = -2.5; e.dispatchEvent(new Event('input', {bubbles: true})); }")
        _wait(page, f"document.getElementById('decoded').src !== {moved!r}")
        assert page.inner_text("#zval3") == "-2.50"
        assert page.is_disabled("input.zslider[data-dim='0']")  # on the pad, not a slider
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
    _shot(page, tmp_path, "report")
    assert not page.errors, page.errors
    # the picture of the training curves is a PNG with its provenance
    src = page.eval_on_selector("section#curves img", "e => e.src")
    import base64

    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert im.format == "PNG" and im.text["picture"] == "training curves from metrics.jsonl"
