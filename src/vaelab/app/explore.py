"""``vaelab explore RUN``: a local web app over a trained model's latent space.

* a 2-D pad over any two top-layer latent dimensions plus sliders for the others, decoded live;
* draw (canvas) or upload an image: its posterior mean, its reconstruction, samples from Q(z|X);
* pick two test images and walk the interpolation between them;
* conditional models: pick a class (label condition), or draw / erase / hide part of an image and
  get several completions (Doersch 2016, Sec. 4.2, with :func:`vaelab.viz.complete.complete_images`).

The model is loaded once (:class:`Explorer`, no HTTP in it); :func:`make_app` puts a Starlette app in
front of it with fixed routes only (nothing is ever served from a path taken from a request), every
request validated before any work (:class:`BadRequest` -> a 4xx JSON ``{"error": ...}``), the body
size limit enforced while the body is read, and no traceback ever sent. Models with several
stochastic layers are explored in their top layer: ``decode(z_top, c)``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from ..conditioning import FixedMaskCondition, LabelCondition, MaskCondition
from ..config import DataSpec
from ..data import to_float
from ..errors import ConfigError, VaelabError
from ..evaluation import eval_mode
from ..models import device_of, generator_for
from ..provenance import python_call, run_provenance
from ..runs import Run
from ..viz import generate as gen
from ..viz.complete import UNOBSERVED, complete_images
from ..viz.grid import png_bytes

RunLike = Run | str | os.PathLike[str]

MAX_BODY = 1 << 20  # bytes in one request body (a 28x28 drawing as PNG is ~1 KB; a photo upload a few 100 KB)
MAX_SIDE = 4096  # pixels on either side of an uploaded image (checked from its header, before decoding)
MAX_PIXELS = 8_000_000  # pixels in an uploaded image
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
DECODE_BUDGET = 4 * MAX_PIXELS  # pixels of uploaded images being decoded at once, all requests together
Z_MAX = 1e4  # |z| beyond this is no point of the latent space anyone explores (and could overflow)
MAX_SAMPLES = 16  # samples / completions per request
MAX_GRID = 64  # images in one sample grid
MAX_STEPS = 32  # interpolation steps
MAX_THUMBS = 64  # test images per listing
ACTIVITY_IMAGES = 500  # test images whose posterior means pick the pad's starting dimensions
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    """A request the explorer refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- validation of request values
MAX_DIGITS = 30  # digits in an integer of a request (every value the explorer takes has far fewer)
_ASCII_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")


def need_number(v: Any, key: str, lo: float, hi: float, integer: bool) -> int | float:
    """``v`` checked to be a number (an integer when ``integer``) in ``lo..hi``; anything else, however
    large or odd, is a :class:`BadRequest` naming ``key`` (never an OverflowError or ValueError)."""
    what = f"an integer in {lo}..{hi}" if integer else f"a finite number in {lo}..{hi}"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise BadRequest(f"{key!r} must be {what}, got {_short(v)!r}")
    try:
        ok = math.isfinite(v) and lo <= v <= hi
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise BadRequest(f"{key!r} = {_short(v)} is out of range {lo}..{hi}")
    return v if integer else float(v)


def _short(v: Any) -> str:
    """At most 40 characters of ``v`` for a message (str() of an int past 4300 digits raises)."""
    try:
        return str(v)[:40]
    except ValueError:
        return "(a number too long to show)"


def need_int(d: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise BadRequest(f"{key!r} is required (an integer in {lo}..{hi})")
    return int(need_number(v, key, lo, hi, integer=True))


def need_float(d: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    return float(need_number(d.get(key, default), key, lo, hi, integer=False))


def parse_uint(text: str | None, key: str, lo: int, hi: int, default: int | None = None) -> int:
    """A non-negative integer written in ASCII digits (a query parameter, a header) in ``lo..hi``:
    ``"\u00b2"`` (which ``str.isdigit`` accepts), signs, spaces and thousands of digits are refused."""
    if text is None:
        if default is None:
            raise BadRequest(f"{key!r} is required (an integer in {lo}..{hi})")
        return default
    if not _ASCII_DIGITS.fullmatch(text):
        raise BadRequest(f"{key!r} must be an integer in {lo}..{hi} written in digits 0-9, got {text[:40]!r}")
    return int(need_number(int(text), key, lo, hi, integer=True))


def need_z(d: dict[str, Any], dim: int) -> torch.Tensor:
    """``z``: a list of ``dim`` finite numbers with |z| <= Z_MAX -> (1, dim) float32."""
    z = d.get("z")
    if not isinstance(z, list):
        raise BadRequest(f"'z' must be a list of {dim} numbers (the top layer's latent code)")
    if len(z) != dim:
        raise BadRequest(f"'z' has {len(z)} values, this model's top latent layer has {dim}")
    for i, v in enumerate(z):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRequest(f"z[{i}] is not a number: {_short(v)!r}")
        try:
            ok = math.isfinite(v) and abs(v) <= Z_MAX
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise BadRequest(f"z[{i}] = {_short(v)} must be finite with |z| <= {Z_MAX:g}")
    return torch.tensor([z], dtype=torch.float32)


def parse_json(body: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise BadRequest(f"{name} is not a number JSON allows")

    def bounded_int(text: str) -> int:  # before int(): past 4300 digits it raises ValueError
        if len(text.lstrip("-")) > MAX_DIGITS:
            raise BadRequest(f"a number of {len(text.lstrip('-'))} digits is past the {MAX_DIGITS} digits "
                             "the explorer accepts")
        return int(text)

    try:
        d = json.loads(body.decode("utf-8"), parse_constant=no_constants, parse_int=bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise BadRequest("the body must be a JSON object")
    return d


class PixelBudget:
    """Pixels of uploaded images decoded at full size at once, across all requests: past
    :data:`DECODE_BUDGET` (read at each request) a request is answered 503 instead of waiting or
    piling up memory (uvicorn admits 64 connections; 64 images of 8 M pixels would be GBs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0

    def acquire(self, pixels: int) -> int:
        with self.lock:
            if self.in_flight + pixels > DECODE_BUDGET:
                raise BadRequest(f"the server is decoding other images ({self.in_flight} of {DECODE_BUDGET} "
                                 "pixels in flight); try again in a moment", 503)
            self.in_flight += pixels
        return pixels

    def release(self, pixels: int) -> None:
        if pixels:
            with self.lock:
                self.in_flight -= pixels


_decoding = PixelBudget()


def decode_image(data: Any, spec: DataSpec, key: str = "image", invert: bool = False) -> torch.Tensor:
    """An image given as base64 (optionally a ``data:image/...;base64,`` URI) -> (1, C, H, W) in [0, 1]
    at the model's size (centre-cropped to its aspect, resized). Format and size are checked from the
    header before any pixel is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise BadRequest(f"{key!r} must be an image as a base64 string (PNG, JPEG, GIF, BMP or WEBP)")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise BadRequest(f"{key!r}: a data URI must be data:image/...;base64,...")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{key!r} is not valid base64") from None
    held = 0
    try:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format not in IMAGE_FORMATS:
                    raise BadRequest(f"{key!r}: {im.format} images are not accepted; send "
                                     f"{', '.join(IMAGE_FORMATS)}", 415)
                w, h = im.size
                if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
                    raise BadRequest(f"{key!r}: a {w}x{h} image is too large (at most {MAX_SIDE} pixels a "
                                     f"side and {MAX_PIXELS} in all)", 413)
                held = _decoding.acquire(w * h)  # until it is shrunk to the model's size
                im.seek(0)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")  # transparent = no ink: composite over black
                    im2 = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
                else:
                    im2 = im.copy()
        except BadRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                EOFError) as e:
            raise BadRequest(f"{key!r} is not a readable image ({type(e).__name__}: {str(e)[:80]})") from None
        c, hh, ww = spec.shape
        im2 = im2.convert("L" if c == 1 else "RGB")
        if invert:
            im2 = ImageOps.invert(im2)
        im2 = ImageOps.fit(im2, (ww, hh), Image.LANCZOS)
    finally:
        _decoding.release(held)
    t = torch.frombuffer(bytearray(im2.tobytes()), dtype=torch.uint8).reshape(hh, ww, -1).permute(2, 0, 1)
    if t.shape[0] != c:  # e.g. RGB for a 4-channel model: repeat what there is
        t = t[:1].expand(c, -1, -1) if c != 3 else t[:3]
    return to_float(t[None].contiguous())


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- the model, loaded once
class DrawnMask(FixedMaskCondition):
    """A mask a user drew (1 = observed), presented the way the model's own condition presents its
    observation (noisy binarization, mask in c or not), so c keeps the layout the networks know."""

    region = "the pixels you left visible"

    def __init__(self, own: MaskCondition, mask: torch.Tensor) -> None:
        super().__init__("drawn", own.spec)
        self.noisy, self.include_mask = own.noisy, own.include_mask
        self._mask = mask  # (H, W) bool

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return self._mask


@dataclass
class Explorer:
    """A run opened for exploring: every operation of the web app, without HTTP."""

    run: Run

    def __post_init__(self) -> None:
        self.model = self.run.model
        self.spec = self.run.spec
        self.dims = tuple(self.model.latent_dims)
        self.top = self.dims[-1] if self.dims else 0
        self._range: float | None = None
        self._pad: list[int] | None = None
        self.cond = self.run.condition
        self.kind = ("label" if isinstance(self.cond, LabelCondition) else
                     "mask" if isinstance(self.cond, MaskCondition) else "none")
        self.lock = threading.Lock()  # one model, one computation at a time
        self._tests: int | None = None

    @classmethod
    def open(cls, run: RunLike, which: str = "best", device: str = "cpu", data_dir: str | None = None) -> Explorer:
        return cls(Run.of(run, which, device=device, data_dir=data_dir))

    # -- helpers
    def _prov(self, picture: str, **extra: Any) -> dict[str, str]:
        return run_provenance(self.run, picture, python_call("explore", run=str(self.run.root)), **extra)

    def _png(self, imgs: torch.Tensor, nrow: int | None = None, picture: str = "", scale: int = 1, **extra: Any) -> bytes:
        return png_bytes(imgs, nrow=nrow, scale=scale, pad=0 if imgs.shape[0] == 1 else 2,
                         provenance=self._prov(picture, **extra))

    def test_count(self) -> int:
        if self._tests is None:
            try:
                self._tests = len(self.run.data("test"))
            except VaelabError:
                self._tests = 0  # the data set is not where the run found it: no test images to pick
        return self._tests

    def _test_x(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.test_count()
        if n == 0:
            raise BadRequest("this run's test images cannot be loaded (is its data set still in place?)", 409)
        if not 0 <= index < n:
            raise BadRequest(f"test image {index} does not exist (0..{n - 1})")
        data = self.run.data("test", limit=1, start=index)
        return to_float(data.images), data.labels

    def _need_latent(self, what: str) -> None:
        if not self.top:
            raise BadRequest(f"{what} needs a latent space, and this model has no latent variables", 409)

    def condition(self, d: dict[str, Any], n: int) -> torch.Tensor | None:
        """c for n rows from a request: ``label`` (label models), the observation of test image
        ``observe`` (mask models, seed 0), or None."""
        if self.kind == "label":
            label = need_int(d, "label", 0, self.cond.dim - 1, 0)
            return self.cond.encode_labels(torch.tensor([label])).to(device_of(self.model)).expand(n, -1)
        if self.kind == "mask":
            x, _ = self._test_x(need_int(d, "observe", 0, max(0, self.test_count() - 1), 0))
            obs = self.cond.observe(x.to(device_of(self.model)), generator_for(self.model, 0))
            return self.cond.encode_observation(obs).expand(n, -1)
        return None

    # -- operations
    def info(self) -> dict[str, Any]:
        r = self.run
        out: dict[str, Any] = {
            "run": str(r.root), "checkpoint": r.checkpoint.name, "epoch": r.state.get("epoch"),
            "step": r.state.get("step"), "model": r.config.model.model, "data": r.config.data.name,
            "shape": list(self.spec.shape), "latent_dims": list(self.dims), "top": self.top,
            "condition": self.kind, "condition_text": self.cond.describe(), "classes": self.spec.num_classes,
            "tests": self.test_count(), "max_body": MAX_BODY, "max_samples": MAX_SAMPLES, "max_steps": MAX_STEPS,
            "prior": r.config.model.prior, "range": self.latent_range(), "pad_dims": self.pad_dims(),
            "activity_images": min(self.test_count(), ACTIVITY_IMAGES),
        }
        if self.kind == "mask":
            out["include_mask"] = bool(self.cond.include_mask)
            out["region"] = self.cond.region
            if isinstance(self.cond, FixedMaskCondition):
                _, h, w = self.spec.shape
                m = self.cond.region_mask(h, w).to(torch.float32)[None, None]
                out["region_mask"] = data_uri(png_bytes(m, scale=1, pad=0))
        return out

    def latent_range(self) -> float:
        """Half-width of the pad and the sliders: 3 prior standard deviations around the prior's mean in
        every top-layer dimension (3 for N(0, I); wider or narrower for a learned prior), measured from
        draws and rounded up to a half unit (with 0.2 of slack for the draws' noise)."""
        if not self.top:
            return 3.0
        if self._range is None:
            with self.lock:
                mu, sd = gen.prior_spread(self.model)
            self._range = max(1.0, math.ceil(2 * float((mu.abs() + 3 * sd).max()) - 0.4) / 2)
        return self._range

    def pad_dims(self) -> list[int]:
        """The two top-layer dimensions the pad starts on: the most active ones, whose posterior mean
        varies most over the first :data:`ACTIVITY_IMAGES` test images
        (:func:`vaelab.viz.generate.most_active_dims`), in increasing order; [0, 1] when the test
        images cannot be loaded, [0, 0] for a 1-D top layer."""
        if self._pad is None:
            dims: tuple[int, ...] = (0, 1) if self.top > 1 else (0, 0)
            if self.top > 1 and self.test_count() > 0:
                with self.lock:
                    b, _ = gen.first_test_images(self.run, ACTIVITY_IMAGES)
                    dims = gen.most_active_dims(self.model, b.x, b.c, top=2)
            self._pad = list(dims)
        return self._pad

    @torch.no_grad()
    def prior_draw(self, d: dict[str, Any]) -> dict[str, Any]:
        """One z from the model's own prior (a mixture or VampPrior as well as N(0, I))."""
        self._need_latent("drawing from the prior")
        g = generator_for(self.model, need_int(d, "seed", 0, 2**31 - 1, 0))
        with self.lock, eval_mode(self.model):
            z = self.model.prior().sample_n(1, g)[0]
        return {"z": [round(float(v), 5) for v in z.tolist()]}

    @torch.no_grad()
    def decode(self, d: dict[str, Any]) -> bytes:
        """The decoded image (the likelihood's mean) of z: PNG bytes at the model's size."""
        self._need_latent("decoding")
        z = need_z(d, self.top).to(device_of(self.model))
        c = self.condition(d, 1)
        with self.lock, eval_mode(self.model):
            x = self.model.decode(z, c).mean.clamp(0, 1)
        return self._png(x, picture="decoded z", z=",".join(f"{v:.4g}" for v in z[0].tolist()))

    @torch.no_grad()
    def encode(self, d: dict[str, Any]) -> dict[str, Any]:
        """An image -> its top-layer posterior mean and std, its reconstruction, samples z ~ Q(z|X) decoded."""
        self._need_latent("encoding")
        if "test" in d:
            x, labels = self._test_x(need_int(d, "test", 0, max(0, self.test_count() - 1)))
        else:
            x = decode_image(d.get("image"), self.spec, invert=bool(d.get("invert", False)))
        n = need_int(d, "samples", 0, MAX_SAMPLES, 8)
        dev = device_of(self.model)
        x = x.to(dev)
        g = generator_for(self.model, need_int(d, "seed", 0, 2**31 - 1, 0))
        if self.kind == "mask":
            c = self.cond.encode_observation(self.cond.observe(x, g))
        else:
            c = self.condition(d, 1)
        with self.lock, eval_mode(self.model):
            q = self.model.encode(x, c)[-1]
            mean = q.mean  # (1, L)
            rec = self.model.decode(mean, c).mean.clamp(0, 1)
            samples = []
            if n:
                zs = q.rsample(g, sample_shape=(n,)).reshape(n, self.top)  # (n, L)
                samples = self.model.decode(zs, None if c is None else c.expand(n, -1)).mean.clamp(0, 1)
        std = getattr(q, "std", None)
        return {
            "input": data_uri(self._png(x, picture="the image as the model sees it")),
            "mean": [round(float(v), 5) for v in mean[0].tolist()],
            "std": None if std is None else [round(float(v), 5) for v in torch.as_tensor(std)[0].tolist()],
            "reconstruction": data_uri(self._png(rec, picture="reconstruction: decoded posterior mean")),
            "samples": [data_uri(self._png(s[None], picture="decoded z ~ Q(z|X)")) for s in samples],
        }

    def test_images(self, start: int, count: int) -> dict[str, Any]:
        total = self.test_count()
        if total == 0:
            raise BadRequest("this run's test images cannot be loaded (is its data set still in place?)", 409)
        if start >= total:
            raise BadRequest(f"'start' = {start} is past the last test image ({total - 1})")
        data = self.run.data("test", limit=min(count, total - start), start=start)
        x = to_float(data.images)
        return {"total": total, "start": start,
                "images": [data_uri(self._png(x[i : i + 1], picture=f"test image {start + i}")) for i in range(len(x))],
                "labels": None if data.labels is None else [int(v) for v in data.labels]}

    @torch.no_grad()
    def interpolate(self, d: dict[str, Any]) -> dict[str, Any]:
        self._need_latent("interpolation")
        if self.kind == "mask":
            raise BadRequest("interpolation is for unconditional and label-conditioned models (a partial "
                             "observation changes what z means); use the completions instead", 409)
        last = max(0, self.test_count() - 1)
        a, b = need_int(d, "a", 0, last), need_int(d, "b", 0, last)
        steps = need_int(d, "steps", 2, MAX_STEPS, 10)
        xa, _ = self._test_x(a)
        xb, _ = self._test_x(b)
        dev = device_of(self.model)
        c = self.condition(d, 1)
        with self.lock:
            imgs = gen.interpolate_images(self.model, xa[0].to(dev), xb[0].to(dev), steps, c)
        return {"frames": [data_uri(self._png(imgs[i : i + 1], picture=f"interpolation {a}->{b}, step {i}"))
                           for i in range(steps)]}

    def samples(self, d: dict[str, Any]) -> dict[str, Any]:
        self._need_latent("sampling")
        if self.kind == "mask":
            raise BadRequest("this model completes partial observations: use the completions", 409)
        n = need_int(d, "n", 1, MAX_GRID, 16)
        seed = need_int(d, "seed", 0, 2**31 - 1, 0)
        t = need_float(d, "temperature", 0.0, 10.0, 1.0)
        c = self.condition(d, n)
        with self.lock:
            imgs = gen.sample_images(self.model, n, seed=seed, temperature=t, c=c)
        label = d.get("label") if self.kind == "label" else None
        return {"grid": data_uri(self._png(imgs, nrow=min(8, n), scale=2, picture="samples from the prior",
                                           seed=seed, temperature=t, label=label))}

    def complete(self, d: dict[str, Any]) -> dict[str, Any]:
        """Completions of an image (drawn, uploaded or a test image) from the part left visible: the
        model's own observed region, minus what the user hid (``mask``, white = visible)."""
        if self.kind != "mask":
            hint = " (pick a class to sample instead)" if self.kind == "label" else ""
            raise BadRequest(f"completion needs a model conditioned on a partial observation{hint}", 409)
        if "test" in d:
            x, _ = self._test_x(need_int(d, "test", 0, max(0, self.test_count() - 1)))
        else:
            x = decode_image(d.get("image"), self.spec, invert=bool(d.get("invert", False)))
        n = need_int(d, "samples", 1, MAX_SAMPLES, 6)
        seed = need_int(d, "seed", 0, 2**31 - 1, 0)
        _, h, w = self.spec.shape
        own = (self.cond.region_mask(h, w) if isinstance(self.cond, FixedMaskCondition)
               else torch.ones(h, w, dtype=torch.bool))
        if d.get("mask") is not None:
            drawn = decode_image(d["mask"], DataSpec((1, h, w)), key="mask")[0, 0] > 0.5
            own = own & drawn
        cond = DrawnMask(self.cond, own)
        with self.lock:
            comp = complete_images(self.model, x.to(device_of(self.model)), samples=n, seed=seed, condition=cond)
        return {
            "observed": data_uri(self._png(comp.observed, picture=f"observed (unobserved pixels at {UNOBSERVED} grey)")),
            "completions": [data_uri(self._png(comp.samples[0, i : i + 1], picture="completion", seed=seed,
                                               temperature=1.0)) for i in range(n)],
            "visible": int(own.sum()), "pixels": h * w,
        }


# ---------------------------------------------------------------- HTTP
def _static(name: str) -> bytes:
    return resources.files("vaelab.app").joinpath("static", name).read_bytes()


async def read_body(request: Any, limit: int = MAX_BODY, timeout: float | None = None) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes: the declared length is
    checked first, then the bytes actually received, chunk by chunk (a lying or absent header does
    not get past); 408 when the client sends nothing for ``timeout`` seconds (default
    :data:`BODY_TIMEOUT`) in the middle of it, so a stalled upload does not hold a request slot."""
    import asyncio

    timeout = BODY_TIMEOUT if timeout is None else timeout
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _ASCII_DIGITS.fullmatch(declared):
            raise BadRequest("invalid Content-Length header (digits 0-9 expected)")
        if int(declared) > limit:
            raise BadRequest(f"the request body is {int(declared)} bytes, the limit is {limit}", 413)
    buf = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BadRequest(f"the request body stalled: nothing received for {timeout:g} s", 408) from None
        buf += chunk
        if len(buf) > limit:
            raise BadRequest(f"the request body passed the limit of {limit} bytes", 413)
    return bytes(buf)


HEADER_TIMEOUT = 10.0  # seconds a connection has to send a request's headers (from connecting, or its last response)
BODY_TIMEOUT = 30.0  # seconds a request body may stall between two chunks
SLOW_PER_CLIENT = 8  # connections of one client address still sending headers; past it, its oldest is closed


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT, per_client: int = SLOW_PER_CLIENT) -> type:
    """uvicorn's h11 protocol with the two guards a slow client needs, which uvicorn lacks: a
    connection that has not sent a request's headers within ``header_timeout`` seconds is closed, and
    one client address keeps at most ``per_client`` connections waiting for their headers (a new one
    closes its oldest). Connections that never finish their headers can then neither pile up nor
    fill uvicorn's ``limit_concurrency``, so they do not lock the user out (all local clients share
    127.0.0.1: the newest connection wins, as the user's own does). One class per server: the
    waiting connections are counted per class."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict[str, dict[Any, None]] = {}  # client host -> its connections waiting for headers, oldest first

    class GuardedH11Protocol(H11Protocol):
        _timer: Any = None

        def _host(self) -> str:
            return self.client[0] if self.client else ""

        def _await_headers(self) -> None:
            queue = waiting.setdefault(self._host(), {})
            queue[self] = None
            while len(queue) > per_client:
                next(iter(queue))._drop()
            self._timer = self.loop.call_later(header_timeout, self._drop)

        def _headers_done(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            queue = waiting.get(self._host(), {})
            queue.pop(self, None)
            if not queue:
                waiting.pop(self._host(), None)

        def _drop(self) -> None:
            self._headers_done()
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._headers_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._timer is None and self.cycle is not None \
                    and self.cycle.response_complete:
                self._await_headers()  # kept alive: the next request's headers are timed again

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return GuardedH11Protocol


#: sent with every response: the page loads its own script and style only, and images from data: URIs
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                 b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def make_app(explorer: Explorer, *, allowed_hosts: list[str] | None = None, max_body: int = MAX_BODY) -> Any:
    """The Starlette app of ``explorer``: fixed routes, validated JSON in, JSON or PNG out.

    ``allowed_hosts``: Host header values accepted (default: any); serving on 127.0.0.1, give the
    local names, so that a web page elsewhere cannot reach the app through DNS rebinding."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pages = {"/": ("explore.html", "text/html; charset=utf-8"), "/explore.js": ("explore.js", "text/javascript"),
             "/explore.css": ("explore.css", "text/css")}
    content = {path: (_static(name), mime) for path, (name, mime) in pages.items()}  # read once, at start

    def page(path: str):
        body, mime = content[path]

        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=mime)

        return endpoint

    async def json_of(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest("send a JSON body with Content-Type: application/json", 415)
        return parse_json(await read_body(request, max_body))

    def post(op):
        async def endpoint(request: Request) -> Response:
            d = await json_of(request)
            out = await run_in_threadpool(op, d)
            if isinstance(out, bytes):
                return Response(out, media_type="image/png", headers={"Cache-Control": "no-store"})
            return JSONResponse(out)

        return endpoint

    async def info(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(explorer.info))

    async def tests(request: Request) -> Response:
        start = parse_uint(request.query_params.get("start"), "start", 0, 10**9, 0)
        count = parse_uint(request.query_params.get("count"), "count", 1, MAX_THUMBS, 24)
        return JSONResponse(await run_in_threadpool(explorer.test_images, start, count))

    def error(message: str, status: int) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    async def bad_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return error(str(exc), exc.status)

    async def vaelab_error(request: Request, exc: Exception) -> Response:
        return error(str(exc), 400)  # a value the library refused (one line, as on the command line)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(str(exc.detail), exc.status_code)

    async def internal(request: Request, exc: Exception) -> Response:
        print(f"vaelab explore: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error("internal error (the server logged it)", 500)

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask for one; there is none to send

    routes = [Route(p, page(p), methods=["GET"]) for p in pages]
    routes.append(Route("/favicon.ico", no_icon, methods=["GET"]))
    routes += [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/tests", tests, methods=["GET"]),
        Route("/api/decode", post(explorer.decode), methods=["POST"]),
        Route("/api/encode", post(explorer.encode), methods=["POST"]),
        Route("/api/interpolate", post(explorer.interpolate), methods=["POST"]),
        Route("/api/samples", post(explorer.samples), methods=["POST"]),
        Route("/api/prior", post(explorer.prior_draw), methods=["POST"]),
        Route("/api/complete", post(explorer.complete), methods=["POST"]),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        BadRequest: bad_request, VaelabError: vaelab_error, HTTPException: http_error, Exception: internal})

    return app


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: cannot be resolved ({e})") from None
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and without it a reply
    # written in two parts waits ~40 ms for a delayed ACK on every keep-alive request
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog from now on, before the server loop starts
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (try another --port)") from None
    return sock


def server_config(app: Any, header_timeout: float = HEADER_TIMEOUT) -> Any:
    """uvicorn's settings for the explorer: the guarded h11 protocol (header timeout, slow connections
    per client), short keep-alive, at most 64 connections and requests in flight (503 past it), and
    request heads of at most 64 KiB."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(header_timeout), log_level="warning", access_log=False,
                          timeout_keep_alive=5, limit_concurrency=64, h11_max_incomplete_event_size=64 * 1024)


def serve(run: RunLike, *, host: str = "127.0.0.1", port: int = 8765, which: str = "best", device: str = "auto",
          data_dir: str | None = None) -> None:
    """Open ``run`` once and serve the explorer at http://host:port/ until interrupted (port 0: any free one).
    Only 127.0.0.1 unless another ``host`` is asked for; the address is printed when it is ready."""
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port!r}")
    explorer = Explorer.open(run, which, device=device, data_dir=data_dir)
    local = host in LOCAL_HOSTS
    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if local else None
    app = make_app(explorer, allowed_hosts=allowed)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"vaelab explore: {explorer.run.root} ({explorer.run.checkpoint.name}, epoch "
          f"{explorer.run.state.get('epoch')}) at http://{shown}:{bound}/  (Ctrl-C to stop)", flush=True)
    if not local:
        print(f"vaelab explore: warning: listening on {host}, reachable from other machines", file=sys.stderr)
    config = server_config(app)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
