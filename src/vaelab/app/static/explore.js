// vaelab explore: plain JavaScript over the explorer's JSON/PNG API (no build step, no dependencies).
"use strict";

const $ = (id) => document.getElementById(id);
let RANGE = 3; // the pad and the sliders span z in [-RANGE, RANGE] (the server sets it from the prior)
const state = { info: null, z: [], dx: 0, dy: 1, busy: false, pending: false, decodes: 0, a: null, b: null,
                frames: [], mean: null };

function status(msg, ok) {
  const s = $("status");
  s.textContent = msg || "";
  s.className = ok ? "ok" : "";
}

async function errorOf(res) {
  try { return (await res.json()).error || res.statusText; } catch (e) { return res.statusText; }
}

async function postJSON(path, body) {
  const res = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
  if (!res.ok) throw new Error(await errorOf(res));
  return res;
}

function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

function img(src, alt, cls) {
  const el = document.createElement("img");
  el.src = src;
  el.alt = alt || "";
  if (cls) el.className = cls;
  return el;
}

// the condition a request carries: the class (label models) or the test image observed (mask models)
function condition() {
  const c = {};
  if (state.info.condition === "label") c.label = Number($("pad-label").value);
  if (state.info.condition === "mask") c.observe = Number($("pad-observe").value);
  return c;
}

// ---------------------------------------------------------------- latent pad and sliders
function drawPad() {
  const cv = $("pad"), g = cv.getContext("2d"), w = cv.width, h = cv.height;
  g.fillStyle = "#fafafa"; g.fillRect(0, 0, w, h);
  g.strokeStyle = "#ddd"; g.lineWidth = 1;
  for (let v = -RANGE; v <= RANGE; v++) {
    const x = (v + RANGE) / (2 * RANGE) * w, y = (RANGE - v) / (2 * RANGE) * h;
    g.beginPath(); g.moveTo(x, 0); g.lineTo(x, h); g.stroke();
    g.beginPath(); g.moveTo(0, y); g.lineTo(w, y); g.stroke();
  }
  g.strokeStyle = "#999"; g.beginPath(); g.moveTo(w / 2, 0); g.lineTo(w / 2, h); g.moveTo(0, h / 2); g.lineTo(w, h / 2); g.stroke();
  g.fillStyle = "#555"; g.font = "11px sans-serif";
  g.fillText(`z[${state.dx}] →`, w - 52, h / 2 - 4); g.fillText(`↑ z[${state.dy}]`, w / 2 + 4, 12);
  const px = (state.z[state.dx] + RANGE) / (2 * RANGE) * w, py = (RANGE - state.z[state.dy]) / (2 * RANGE) * h;
  g.fillStyle = "#d62728"; g.beginPath(); g.arc(px, py, 6, 0, 2 * Math.PI); g.fill();
}

function buildSliders() {
  const box = $("sliders");
  box.textContent = "";
  state.z.forEach((v, i) => {
    const label = document.createElement("span");
    label.textContent = `z[${i}]`;
    const s = document.createElement("input");
    Object.assign(s, { type: "range", min: -RANGE, max: RANGE, step: 0.01, value: v });
    s.className = "zslider"; s.dataset.dim = i; s.setAttribute("aria-label", `z[${i}]`);
    const out = document.createElement("span");
    out.className = "zval"; out.id = `zval${i}`;
    s.addEventListener("input", () => { state.z[i] = Number(s.value); syncSliders(); drawPad(); requestDecode(); });
    const row = document.createElement("div");
    row.className = "zrow";
    row.append(label, s, out);
    box.append(row);
  });
  syncSliders();
}

function syncSliders() {
  document.querySelectorAll("input.zslider").forEach((s) => {
    const i = Number(s.dataset.dim), onPad = i === state.dx || i === state.dy;
    s.value = state.z[i];
    s.disabled = onPad;
    s.previousSibling.className = onPad ? "onpad" : "";
    $(`zval${i}`).textContent = state.z[i].toFixed(2);
  });
  $("ztext").textContent = state.z.length <= 8 ? `z = [${state.z.map((v) => v.toFixed(2)).join(", ")}]` : "";
}

// Live decoding: one request in flight at a time; moves made meanwhile are sent as one when it returns.
async function requestDecode() {
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  try {
    do {
      state.pending = false;
      const res = await postJSON("/api/decode", { z: state.z, ...condition() });
      const url = await blobToDataURL(await res.blob());
      $("decoded").src = url;
      $("save").href = url; // the PNG as the server wrote it, with its provenance (z included)
      state.decodes += 1;
      document.body.dataset.decodes = String(state.decodes);
    } while (state.pending);
    status("");
  } catch (e) {
    status(`decode: ${e.message}`);
  } finally {
    state.busy = false;
  }
}

function setupPad() {
  const cv = $("pad");
  const move = (ev) => {
    const r = cv.getBoundingClientRect();
    const fx = Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width));
    const fy = Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height));
    state.z[state.dx] = -RANGE + 2 * RANGE * fx;
    state.z[state.dy] = RANGE - 2 * RANGE * fy;
    syncSliders(); drawPad(); requestDecode();
  };
  cv.addEventListener("pointerdown", (ev) => { cv.setPointerCapture(ev.pointerId); move(ev); });
  cv.addEventListener("pointermove", (ev) => { if (ev.buttons) move(ev); });
  const L = state.z.length;
  for (const [id, dflt] of [["dimx", state.dx], ["dimy", state.dy]]) {
    const sel = $(id);
    for (let i = 0; i < L; i++) sel.add(new Option(String(i), String(i)));
    sel.value = String(dflt);
    sel.addEventListener("change", () => {
      const x = Number($("dimx").value), y = Number($("dimy").value);
      if (x === y && L > 1) { status("pick two different dimensions for the pad"); return; }
      state.dx = x; state.dy = y; syncSliders(); drawPad();
    });
  }
  $("zero").addEventListener("click", () => { state.z.fill(0); syncSliders(); drawPad(); requestDecode(); });
  $("random").addEventListener("click", async () => { // a draw from the model's own prior, clipped to the pad
    try {
      const res = await postJSON("/api/prior", { seed: Math.floor(Math.random() * 2147483647) });
      if (!res.ok) throw new Error(await errorOf(res));
      state.z = (await res.json()).z.map((v) => Math.max(-RANGE, Math.min(RANGE, v)));
      syncSliders(); drawPad(); requestDecode();
    } catch (e) { status(String(e.message || e)); }
  });
  const cc = $("cond-controls");
  if (state.info.condition === "label") {
    const sel = document.createElement("select");
    sel.id = "pad-label";
    for (let k = 0; k < state.info.classes; k++) sel.add(new Option(String(k), String(k)));
    sel.addEventListener("change", requestDecode);
    const l = document.createElement("label"); l.append("class ", sel); cc.append(l);
  } else if (state.info.condition === "mask") {
    const inp = document.createElement("input");
    Object.assign(inp, { type: "number", id: "pad-observe", min: 0, max: Math.max(0, state.info.tests - 1), value: 0 });
    inp.addEventListener("change", requestDecode);
    const l = document.createElement("label"); l.append("observing test image ", inp); cc.append(l);
  }
}

// z as a JSON list (5 decimals), to the clipboard; where the page has no clipboard (served over plain
// http from another host, or permission refused) it is shown selected in a text field instead
async function copyZ() {
  const text = JSON.stringify(state.z.map((v) => Math.round(v * 1e5) / 1e5));
  const field = $("z-json");
  field.value = text;
  let copied = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); copied = true; }
  } catch (e) { /* refused: the text field below */ }
  field.hidden = copied;
  if (copied) status(`copied z (${state.z.length} numbers, JSON) to the clipboard`, true);
  else { field.focus(); field.select(); status("this page cannot reach the clipboard: z is selected in the text field, copy it from there", true); }
  document.body.dataset.copied = String(Number(document.body.dataset.copied || 0) + 1);
}

function setupSave() {
  const name = state.info.run.split(/[\\/]/).filter(Boolean).pop() || "vaelab";
  $("save").download = `${name}-decoded.png`;
  $("copy-z").addEventListener("click", copyZ);
}

// ---------------------------------------------------------------- drawing canvases
function drawingCanvas(cv, onStroke) {
  const g = cv.getContext("2d");
  const pen = { colour: "#fff", width: 18, target: g, after: null };
  let last = null;
  const at = (ev) => { const r = cv.getBoundingClientRect();
    return [(ev.clientX - r.left) * cv.width / r.width, (ev.clientY - r.top) * cv.height / r.height]; };
  cv.addEventListener("pointerdown", (ev) => { cv.setPointerCapture(ev.pointerId); last = at(ev); stroke(last); });
  cv.addEventListener("pointermove", (ev) => { if (last && ev.buttons) stroke(at(ev)); });
  const end = () => { if (last) { last = null; if (onStroke) onStroke(); } };
  cv.addEventListener("pointerup", end);
  cv.addEventListener("pointercancel", end);
  function stroke(p) {
    const t = pen.target;
    t.strokeStyle = pen.colour; t.lineWidth = pen.width; t.lineCap = "round"; t.lineJoin = "round";
    t.beginPath(); t.moveTo(last[0], last[1]); t.lineTo(p[0] + 0.01, p[1]); t.stroke();
    last = p;
    if (pen.after) pen.after();
  }
  return pen;
}

function clearCanvas(cv, colour) {
  const g = cv.getContext("2d");
  g.fillStyle = colour; g.fillRect(0, 0, cv.width, cv.height);
}

function loadInto(cv, src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => { const g = cv.getContext("2d"); g.imageSmoothingEnabled = false;
      clearCanvas(cv, "#000"); g.drawImage(im, 0, 0, cv.width, cv.height); resolve(); };
    im.onerror = () => reject(new Error("this file is not an image the browser can show"));
    im.src = src;
  });
}

function toggle(ids, on) { ids.forEach((id) => $(id).classList.toggle("on", id === on)); }

// ---------------------------------------------------------------- encode
async function encodeImage(imageDataURL) {
  try {
    const res = await postJSON("/api/encode", { image: imageDataURL, invert: $("invert").checked, samples: 8,
                                               ...condition() });
    const out = await res.json();
    $("enc-input").src = out.input;
    $("enc-rec").src = out.reconstruction;
    const box = $("enc-samples"); box.textContent = "";
    out.samples.forEach((s, i) => box.append(img(s, `sample ${i} from Q(z|X)`)));
    state.mean = out.mean;
    $("enc-mean").textContent = out.mean.map((v, i) => `z[${i}] ${v.toFixed(3)}` +
      (out.std ? ` ± ${out.std[i].toFixed(3)}` : "")).join("\n");
    $("use-mean").disabled = false;
    document.body.dataset.encoded = String(Number(document.body.dataset.encoded || 0) + 1);
    status("encoded", true);
  } catch (e) {
    status(`encode: ${e.message}`);
  }
}

function setupEncode() {
  const cv = $("draw");
  clearCanvas(cv, "#000");
  const pen = drawingCanvas(cv, () => encodeImage(cv.toDataURL("image/png")));
  $("pen").addEventListener("click", () => { pen.colour = "#fff"; toggle(["pen", "eraser"], "pen"); });
  $("eraser").addEventListener("click", () => { pen.colour = "#000"; toggle(["pen", "eraser"], "eraser"); });
  $("clear").addEventListener("click", () => clearCanvas(cv, "#000"));
  $("encode").addEventListener("click", () => encodeImage(cv.toDataURL("image/png")));
  $("upload").addEventListener("change", async () => {
    const f = $("upload").files[0];
    if (!f) return;
    if (f.size > state.info.max_body * 0.7) { status(`upload: ${f.name} is too large (at most ${Math.floor(state.info.max_body * 0.7 / 1024)} KB)`); return; }
    const url = await blobToDataURL(f);
    try { await loadInto(cv, url); } catch (e) { /* the server says what is wrong with it */ }
    encodeImage(url);
  });
  $("use-mean").addEventListener("click", () => {
    if (!state.mean) return;
    state.z = state.mean.map((v) => Math.max(-RANGE, Math.min(RANGE, v)));
    syncSliders(); drawPad(); requestDecode();
  });
}

// ---------------------------------------------------------------- test images, interpolation
async function testThumbs(box, onPick, count) {
  const res = await fetch(`/api/tests?start=0&count=${count}`);
  if (!res.ok) throw new Error(await errorOf(res));
  const out = await res.json();
  out.images.forEach((src, i) => {
    const k = out.start + i, label = out.labels ? out.labels[i] : null;
    const t = img(src, `test image ${k}` + (label !== null ? `, class ${label}` : ""));
    t.title = t.alt; t.dataset.index = k;
    t.addEventListener("click", () => onPick(k, t));
    const fig = document.createElement("figure"), cap = document.createElement("figcaption");
    cap.textContent = label !== null ? `#${k} · ${label}` : `#${k}`;
    fig.append(t, cap);
    box.append(fig);
  });
  const key = out.labels ? "#index · class label" : "#index (this data set has no labels)";
  document.querySelectorAll("#thumbs-key, .thumbs-key").forEach((e) => { e.textContent = key; });
}

function showFrame(i) {
  if (!state.frames.length) return;
  $("frame").src = state.frames[i];
}

function setupInterp() {
  let next = "a";
  testThumbs($("thumbs"), (i, t) => {
    document.querySelectorAll(`#thumbs img.${next}`).forEach((e) => e.classList.remove(next));
    t.classList.add(next);
    $(next === "a" ? "ia" : "ib").src = t.src;
    state[next] = i;
    next = next === "a" ? "b" : "a";
  }, 32).catch((e) => status(`test images: ${e.message}`));
  $("interp").addEventListener("click", async () => {
    if (state.a === null || state.b === null) { status("pick two test images first (A, then B)"); return; }
    try {
      const res = await postJSON("/api/interpolate", { a: state.a, b: state.b, steps: Number($("steps").value),
                                                       ...condition() });
      state.frames = (await res.json()).frames;
      const strip = $("strip"); strip.textContent = "";
      state.frames.forEach((f, i) => strip.append(img(f, `step ${i}`)));
      const w = $("walk"); w.max = state.frames.length - 1; w.value = 0; w.disabled = false;
      showFrame(0);
      status("");
    } catch (e) { status(`interpolate: ${e.message}`); }
  });
  $("walk").addEventListener("input", () => showFrame(Number($("walk").value)));
}

// ---------------------------------------------------------------- conditional models
function setupClass() {
  const sel = $("class");
  for (let k = 0; k < state.info.classes; k++) sel.add(new Option(String(k), String(k)));
  const go = async () => {
    try {
      const res = await postJSON("/api/samples", { label: Number(sel.value), n: 32, temperature: Number($("temp").value) });
      $("class-grid").src = (await res.json()).grid;
      status("");
    } catch (e) { status(`samples: ${e.message}`); }
  };
  sel.addEventListener("change", go);
  $("class-go").addEventListener("click", go);
  go();
}

function setupComplete() {
  const info = state.info, view = $("cdraw");
  const W = view.width, H = view.height;
  const image = document.createElement("canvas"), mask = document.createElement("canvas"), region = new Image();
  image.width = mask.width = W; image.height = mask.height = H;
  clearCanvas(image, "#000"); clearCanvas(mask, "#fff");
  let haveRegion = false;
  const compose = () => { // the image, tinted red where hidden and grey where the model never observes
    const g = view.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(image, 0, 0);
    const m = mask.getContext("2d").getImageData(0, 0, W, H).data;
    const out = g.getImageData(0, 0, W, H), d = out.data;
    let r = null;
    if (haveRegion) {
      const tmp = document.createElement("canvas"); tmp.width = W; tmp.height = H;
      const tg = tmp.getContext("2d"); tg.imageSmoothingEnabled = false; tg.drawImage(region, 0, 0, W, H);
      r = tg.getImageData(0, 0, W, H).data;
    }
    for (let i = 0; i < d.length; i += 4) {
      if (r && r[i] < 128) { d[i] = d[i] * 0.5 + 60; d[i + 1] = d[i + 1] * 0.5 + 60; d[i + 2] = d[i + 2] * 0.5 + 90; }
      else if (m[i] < 128) { d[i] = d[i] * 0.4 + 150; d[i + 1] *= 0.4; d[i + 2] *= 0.4; }
    }
    g.putImageData(out, 0, 0);
  };
  const pen = drawingCanvas(view, null);
  pen.target = image.getContext("2d"); pen.after = compose;
  const tools = ["c-pen", "c-black", "c-hide", "c-show"];
  const use = (id, target, colour) => $(id).addEventListener("click", () => {
    pen.target = target.getContext("2d"); pen.colour = colour; toggle(tools, id); });
  use("c-pen", image, "#fff"); use("c-black", image, "#000"); use("c-hide", mask, "#000"); use("c-show", mask, "#fff");
  $("c-clear").addEventListener("click", () => { clearCanvas(image, "#000"); clearCanvas(mask, "#fff"); compose(); });
  $("c-from-draw").addEventListener("click", () => { image.getContext("2d").drawImage($("draw"), 0, 0, W, H); compose(); });
  if (info.region_mask) { region.onload = () => { haveRegion = true; compose(); }; region.src = info.region_mask; }
  const what = info.include_mask ? "Hide any part of the image (the model is told which pixels it sees)."
    : `The model observes ${info.region} (the bluish-grey part is never observed); draw, remove ink or hide pixels there.`;
  $("complete-help").textContent = `${what} Then ask for several completions: each is a different z ~ N(0, I) decoded given what is visible.`;
  testThumbs($("c-thumbs"), async (i, t) => { await loadInto(image, t.src); compose(); }, 24)
    .catch((e) => status(`test images: ${e.message}`));
  compose();
  $("complete").addEventListener("click", async () => {
    try {
      const res = await postJSON("/api/complete", { image: image.toDataURL("image/png"), mask: mask.toDataURL("image/png"),
        samples: Number($("c-n").value), seed: Number($("c-seed").value) });
      const out = await res.json();
      $("c-observed").src = out.observed;
      const box = $("c-out"); box.textContent = "";
      out.completions.forEach((s, i) => box.append(img(s, `completion ${i}`)));
      document.body.dataset.completed = String(Number(document.body.dataset.completed || 0) + 1);
      status(`completed from ${out.visible} of ${out.pixels} pixels`, true);
    } catch (e) { status(`complete: ${e.message}`); }
  });
}

// ---------------------------------------------------------------- start
async function main() {
  try {
    const res = await fetch("/api/info");
    if (!res.ok) throw new Error(await errorOf(res));
    const info = state.info = await res.json();
    RANGE = info.range || 3;
    $("random").textContent = info.prior === "standard" ? "z ~ N(0, I)" : `z ~ P(z) (${info.prior} prior)`;
    const layers = info.latent_dims.length ? `latent layers [${info.latent_dims.join(", ")}] (exploring the top one)` : "no latent variables";
    $("info").textContent = `${info.run} — ${info.model} on ${info.data}, checkpoint ${info.checkpoint} ` +
      `(epoch ${info.epoch}, step ${info.step}); ${layers}` + (info.condition_text ? `; ${info.condition_text}` : "");
    if (info.top > 0) {
      state.z = new Array(info.top).fill(0);
      [state.dx, state.dy] = info.pad_dims;
      if (info.top > 2 && info.activity_images > 0) {
        $("pad-why").textContent = `The pad starts on z[${state.dx}] and z[${state.dy}], the two dimensions whose ` +
          `posterior mean E[z|X] varies most over the first ${info.activity_images} test images (the most active units).`;
      }
      ["latent-panel", "encode-panel"].forEach((id) => { $(id).hidden = false; });
      setupPad(); buildSliders(); drawPad(); setupSave(); setupEncode();
      if (info.condition !== "mask") { $("interp-panel").hidden = false; setupInterp(); }
      if (info.condition === "label") { $("class-panel").hidden = false; setupClass(); }
      await requestDecode();
    }
    if (info.condition === "mask") { $("complete-panel").hidden = false; setupComplete(); }
    document.body.dataset.ready = "1";
  } catch (e) {
    status(`could not start: ${e.message}`);
  }
}

main();
