// raymanifold web page: draw or upload an image, see what every served model says about it.
// Plain JavaScript, no library, no build step, no network beyond this server's own JSON routes
// (relative URLs, so the page works under any route_prefix). See docs/web.md.
"use strict";

const rm = window.rm = {
  models: [],        // GET v1/models -> models
  limits: null,      // the app's request limits (from a model card)
  src: null,         // the input image: {w, h, data: Uint8ClampedArray RGBA, from: "pad" | file name}
  empty: true,       // nothing drawn or uploaded since the last Clear
  seq: 0,            // analysis counter (stale answers are dropped)
  strokeEnd: 0,      // performance.now() at the end of the last stroke
  timings: [],       // [{reason, ms}] from the trigger (stroke end, upload, click) to all numbers on screen
  last: {},          // last[model][route] = {request, status, response}: what was sent and answered
};
const KNOWN = new Set(["log-likelihood", "encode", "decode", "sample"]);
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ small DOM helpers
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return (a !== 0 && (a >= 1e6 || a < 1e-3)) ? v.toExponential(digits - 1) : v.toFixed(Math.max(0, digits - Math.max(0, Math.floor(Math.log10(a || 1)) + 1) + 1));
}
function showError(node, text) {
  node.textContent = text;
  node.hidden = !text;
}

// ------------------------------------------------------------------ HTTP
// Every answer: {ok, status, data (JSON) | blob, error (readable, names the field)}.
// With API keys on (serve/auth.py) every JSON route needs "Authorization: Bearer <key>": the key typed
// in the key form is kept in sessionStorage (this tab only, gone when it closes) and sent with each call.
const KEY_STORE = "raymanifold.apiKey";
function apiKey() { try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (exc) { return ""; } }
async function api(path, body) {
  const init = {method: body === undefined ? "GET" : "POST", headers: {}};
  const key = apiKey();
  if (key) init.headers["authorization"] = `Bearer ${key}`;
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["content-type"] = "application/json"; }
  let r;
  try {
    r = await fetch(path, init);
  } catch (exc) {
    return {ok: false, status: 0, error: `could not reach the server (${exc.message})`};
  }
  const ctype = r.headers.get("content-type") || "";
  let data = null, text = "";
  if (ctype.startsWith("application/json")) {
    try { data = await r.json(); } catch (exc) { text = "unreadable JSON answer"; }
  } else if (ctype.startsWith("image/")) {
    return r.ok ? {ok: true, status: r.status, blob: await r.blob()} : {ok: false, status: r.status, error: "error"};
  } else {
    text = (await r.text()).slice(0, 300);
  }
  if (r.ok) return {ok: true, status: r.status, data};
  const d = data && data.detail;
  let msg = d && typeof d === "object" && d.message ? d.message
          : typeof d === "string" ? d : Array.isArray(d) ? d.map((e) => e.msg).join("; ") : text || r.statusText;
  return {ok: false, status: r.status, error: `HTTP ${r.status}: ${msg}`, field: d && d.field, data};
}

// ------------------------------------------------------------------ the input image
const pad = $("pad");
const pctx = pad.getContext("2d", {willReadFrequently: true});

function padSource() {
  return {w: pad.width, h: pad.height, data: pctx.getImageData(0, 0, pad.width, pad.height).data, from: "pad"};
}
function drawSourceOnPad() {  // an uploaded image, scaled up without smoothing (what the models see)
  const c = el("canvas", {width: rm.src.w, height: rm.src.h});
  c.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rm.src.data), rm.src.w, rm.src.h), 0, 0);
  pctx.imageSmoothingEnabled = false;
  pctx.fillStyle = "#000";
  pctx.fillRect(0, 0, pad.width, pad.height);
  pctx.drawImage(c, 0, 0, pad.width, pad.height);
}
function clearPad() {
  pctx.fillStyle = "#000";
  pctx.fillRect(0, 0, pad.width, pad.height);
  rm.src = padSource();
  rm.empty = true;
  $("input-info").textContent = "Cleared: draw a digit (white on black) or upload a PNG.";
}

let drawing = false, lastPt = null;
function padPoint(ev) {
  const r = pad.getBoundingClientRect();
  return [(ev.clientX - r.left) * pad.width / r.width, (ev.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (ev) => {
  ev.preventDefault();
  if (rm.src && rm.src.from !== "pad") rm.src = padSource();  // draw over an upload: the pad becomes the input
  drawing = true;
  pad.setPointerCapture(ev.pointerId);
  lastPt = padPoint(ev);
  stroke(lastPt, lastPt);
});
pad.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = padPoint(ev);
  stroke(lastPt, p);
  lastPt = p;
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  rm.strokeEnd = performance.now();
  rm.src = padSource();
  rm.empty = false;
  $("input-info").textContent = "Drawn on the 280x280 pad; each model gets it resized to its input shape.";
  analyse("stroke");
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
function stroke(a, b) {
  pctx.strokeStyle = "#fff";
  pctx.lineWidth = Number($("brush").value);
  pctx.lineCap = pctx.lineJoin = "round";
  pctx.beginPath();
  pctx.moveTo(a[0], a[1]);
  pctx.lineTo(b[0], b[1]);
  pctx.stroke();
}

// Area-average resize of the input (any size, RGBA over black) to (C, H, W) in [0, 1]: each output pixel is
// the mean of the source area it covers (fractional pixels weighted by the covered fraction). One channel:
// the grey value (R when R = G = B, else ITU-R 601 luma); three: R, G, B.
function axisWeights(n, m) {  // source length n -> m cells: per cell [[index, weight], ...] (weights sum to 1)
  const s = n / m, out = [];
  for (let i = 0; i < m; i++) {
    const a = i * s, b = (i + 1) * s, cell = [];
    for (let k = Math.floor(a); k < Math.min(n, Math.ceil(b)); k++) {
      const w = Math.min(k + 1, b) - Math.max(k, a);
      if (w > 0) cell.push([k, w / s]);
    }
    out.push(cell);
  }
  return out;
}
function toModelInput(src, shape) {
  const [C, H, W] = shape;
  const wy = axisWeights(src.h, H), wx = axisWeights(src.w, W), d = src.data;
  const planes = [];
  for (let ch = 0; ch < C; ch++) planes.push([]);
  for (let i = 0; i < H; i++) {
    const rows = planes.map(() => new Array(W).fill(0));
    for (let j = 0; j < W; j++) {
      const acc = new Array(C).fill(0);
      for (const [r, a] of wy[i]) for (const [c, b] of wx[j]) {
        const o = 4 * (r * src.w + c), alpha = d[o + 3] / 255, w = a * b;
        const R = d[o], G = d[o + 1], B = d[o + 2];
        if (C === 1) acc[0] += w * alpha * ((R === G && G === B) ? R : 0.299 * R + 0.587 * G + 0.114 * B);
        else for (let ch = 0; ch < C; ch++) acc[ch] += w * alpha * [R, G, B][Math.min(ch, 2)];
      }
      for (let ch = 0; ch < C; ch++) rows[ch][j] = Math.min(1, Math.max(0, acc[ch] / 255));
    }
    for (let ch = 0; ch < C; ch++) planes[ch].push(rows[ch]);
  }
  return planes;
}

function drawImageArray(canvas, chw, scale) {  // (C, H, W) in [0, 1] -> canvas, scaled up
  const C = chw.length, H = chw[0].length, W = chw[0][0].length;
  canvas.width = W * scale; canvas.height = H * scale;
  const img = new ImageData(W, H);
  for (let i = 0; i < H; i++) for (let j = 0; j < W; j++) {
    const o = 4 * (i * W + j);
    for (let k = 0; k < 3; k++) img.data[o + k] = Math.round(255 * chw[C === 1 ? 0 : k][i][j]);
    img.data[o + 3] = 255;
  }
  const tmp = el("canvas", {width: W, height: H});
  tmp.getContext("2d").putImageData(img, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, W * scale, H * scale);
}
function drawGrid(canvas, images, scale) {  // (N, C, H, W) -> a grid, ceil(sqrt(N)) per row
  const n = images.length, per = Math.ceil(Math.sqrt(n)), rows = Math.ceil(n / per);
  const H = images[0][0].length, W = images[0][0][0].length, pad1 = 1;
  canvas.width = per * (W * scale + pad1) + pad1; canvas.height = rows * (H * scale + pad1) + pad1;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#333"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((im, k) => {
    const c = el("canvas");
    drawImageArray(c, im, scale);
    ctx.drawImage(c, pad1 + (k % per) * (W * scale + pad1), pad1 + Math.floor(k / per) * (H * scale + pad1));
  });
}

// ------------------------------------------------------------------ upload
async function onUpload(file) {
  showError($("input-error"), "");
  const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  const isPng = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((b, i) => head[i] === b);
  const limit = rm.limits && rm.limits.max_body_bytes;
  if (!isPng || (limit && file.size > limit)) return judgedByApi(file);
  let bmp;
  try {
    bmp = await createImageBitmap(file, {colorSpaceConversion: "none", premultiplyAlpha: "none"});
  } catch (exc) {
    return judgedByApi(file);
  }
  if (bmp.width * bmp.height > 4096 * 4096) {
    showError($("input-error"), `images[0]: ${bmp.width}x${bmp.height} pixels; upload at most 4096x4096`);
    return;
  }
  const c = el("canvas", {width: bmp.width, height: bmp.height});
  const ctx = c.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(bmp, 0, 0);
  rm.src = {w: bmp.width, h: bmp.height, data: ctx.getImageData(0, 0, bmp.width, bmp.height).data, from: file.name};
  rm.empty = false;
  drawSourceOnPad();
  $("input-info").textContent = `Uploaded ${file.name} (${bmp.width}x${bmp.height}); each model gets it resized ` +
    "to its input shape (an image of exactly that size is passed unchanged).";
  analyse("upload");
}

// A file the page cannot read (not a PNG, over the size limit, corrupt) goes to the API as it is, like a
// curl upload: the API's 4xx answer, naming the field, is what the page shows.
async function judgedByApi(file) {
  const m = rm.models.find((m) => m.status === "ok" && m.input.kind === "image" &&
                                  (m.operations["log-likelihood"] || m.operations["encode"]));
  if (!m) { showError($("input-error"), "upload: no served image model takes uploads"); return; }
  const route = m.operations["log-likelihood"] ? "log-likelihood" : "encode";
  const fd = new FormData();
  fd.append("images", file, file.name);
  const res = await api(`v1/models/${encodeURIComponent(m.name)}/${route}`, fd);
  showError($("input-error"), res.ok ? `${file.name}: this browser cannot read the image (the API can); ` +
                                        "upload a plain 8-bit PNG"
                                      : `Upload refused by the API (${route} of ${m.name}): ${res.error}`);
}

// ------------------------------------------------------------------ option forms (from GET v1/models)
function optionsForm(ospec, defaults, extra) {
  const inputs = {};
  const rows = [];
  const add = (name, spec, value) => {
    let input;
    if (spec.type === "bool") input = el("input", {type: "checkbox", checked: value === true});
    else if (spec.choices) {
      input = el("select", {}, spec.choices.map((c) => el("option", {value: c, text: c, selected: c === value})));
    } else {
      input = el("input", {type: spec.type === "str" ? "text" : "number", value: value === null ? "" : value,
                           min: spec.min, max: spec.max, step: spec.type === "float" ? "any" : 1});
    }
    input.dataset.option = name;
    inputs[name] = {input, spec};
    rows.push(el("label", {class: "opt"}, `${name} `, input));
  };
  for (const [name, spec] of Object.entries(extra || {})) add(name, spec, defaults[name] ?? spec.default);
  for (const [name, spec] of Object.entries(ospec.options || {})) add(name, spec, defaults[name] ?? spec.default);
  if (ospec.random) add("seed", {type: "int", default: 0, min: 0, nullable: true}, defaults.seed ?? 0);
  const values = () => {
    const out = {};
    for (const [name, {input, spec}] of Object.entries(inputs)) {
      if (spec.type === "bool") { out[name] = input.checked; continue; }
      const raw = input.value.trim();
      if (raw === "") {  // an empty text option is the empty string; an empty number: null (the API names the field)
        if (spec.type === "str" && !spec.nullable) out[name] = "";
        else if (!spec.nullable) out[name] = null;
        continue;
      }
      if (spec.type === "str") out[name] = raw;
      else out[name] = /^-?\d+(\.\d*)?([eE][-+]?\d+)?$/.test(raw) ? Number(raw) : raw;
    }
    return out;
  };
  return {node: el("div", {class: "opts"}, rows), values, inputs};
}

// ------------------------------------------------------------------ model cards
function sourceBlock(m) {
  const s = (m.card && m.card.source) || {};
  const run = s.run_id
    ? (s.link ? el("a", {href: s.link, target: "_blank", rel: "noopener", "data-testid": "run-link"}, `run ${s.run_id.slice(0, 8)}`)
              : el("span", {"data-testid": "run-id", title: "set card.mlflow_ui in the Serve config to link it"},
                   `run ${s.run_id.slice(0, 8)}`))
    : el("span", {}, `checkpoint ${s.uri || m.uri}${s.step !== null && s.step !== undefined ? ` (step ${s.step})` : ""}`);
  const params = Object.entries(s.params || {}).map(([k, v]) => el("tr", {}, el("td", {text: k}), el("td", {text: String(v)})));
  const metrics = Object.entries(s.metrics || {}).map(([k, v]) => el("tr", {}, el("td", {text: k}), el("td", {text: fmt(v)})));
  return el("details", {class: "source"},
    el("summary", {}, run, s.run_name ? ` · ${s.run_name}` : "", s.status ? ` · ${s.status}` : "",
       s.error ? el("span", {class: "warn", text: ` · ${s.error}`}) : ""),
    el("div", {class: "tables"},
      el("table", {}, el("caption", {text: "key params"}), params),
      metrics.length ? el("table", {}, el("caption", {text: "metrics"}), metrics) : null));
}

function buildCard(m) {
  const card = el("article", {class: "model", "data-model": m.name, "data-testid": `model-${m.name}`});
  const head = el("h3", {}, m.name, el("span", {class: "family", text: m.family || ""}));
  card.append(head);
  m.ui = {card};
  if (m.status !== "ok") {
    card.append(el("div", {class: "error", role: "alert", text: `unavailable: ${m.error}`}));
    return card;
  }
  const inp = m.input;
  const ops = Object.keys(m.operations);
  card.append(el("p", {class: "meta"},
    `${inp.kind} ${inp.shape.join("×")} (${inp.data})${inp.range ? ` in [${inp.range.join(", ")}]` : ""} · `,
    `operations: ${ops.join(", ")}`));
  card.append(sourceBlock(m));
  const ref = m.card && m.card.reference;
  const body = el("div", {class: "ops"});
  card.append(body);
  m.ui.error = el("div", {class: "error", role: "alert", "data-testid": "model-error", hidden: true});
  card.append(m.ui.error);

  // the model's view of the input
  if (inp.kind === "image") {
    m.ui.view = el("canvas", {class: "view", title: "this model's input"});
    body.append(el("div", {class: "op view-box"}, el("h4", {text: `input ${inp.shape.join("×")}`}), m.ui.view));
  } else {
    m.ui.point = el("input", {type: "text", value: new Array(inp.shape[0]).fill(0.5).join(", "),
                              "data-testid": "point", size: 14});
    body.append(el("div", {class: "op"}, el("h4", {text: "input point"}),
      el("label", {}, `x (${inp.shape[0]} numbers) `, m.ui.point),
      el("button", {type: "button", onclick: () => analyse("click")}, "score")));
  }
  if (m.operations["log-likelihood"]) {
    const defaults = Object.assign({}, ref && !ref.error ? ref.options : {}, {seed: ref && !ref.error ? ref.seed : 0});
    m.ui.ll = {form: optionsForm(m.operations["log-likelihood"], defaults), out: el("div", {class: "out", "data-testid": "ll"})};
    body.append(el("div", {class: "op ll"}, el("h4", {text: "log-likelihood"}),
      el("details", {}, el("summary", {text: "options"}), m.ui.ll.form.node), m.ui.ll.out));
  }
  if (m.operations["encode"]) {
    m.ui.enc = {out: el("div", {class: "out", "data-testid": "encode"})};
    body.append(el("div", {class: "op enc"}, el("h4", {text: m.card && m.card.grid ? "latent and grid cell" : "latent"}),
      m.ui.enc.out));
  }
  for (const route of ops.filter((r) => !KNOWN.has(r))) {  // operations added later (classify, purify, ...)
    // ones without options or seed (classify) run with every analysis; the others (purify, counterfactual:
    // costlier, with settings to choose) on their button
    m.ui[route] = {form: optionsForm(m.operations[route], {}), out: el("div", {class: "out", "data-testid": `op-${route}`})};
    const run = el("button", {type: "button", "data-testid": `run-${route}`,
                              onclick: () => runOther(m, route, modelX(m), rm.seq)}, route);
    body.append(el("div", {class: "op other"}, el("h4", {text: route}),
      el("details", {}, el("summary", {text: "options"}), m.ui[route].form.node), run, m.ui[route].out));
  }
  if (m.operations["sample"]) {
    const form = optionsForm(m.operations["sample"], {}, {n: {type: "int", default: 16, min: 1}});
    const out = el("div", {class: "out", "data-testid": "samples"});
    const btn = el("button", {type: "button", "data-testid": "sample-button", onclick: () => runSample(m)}, "sample");
    m.ui.sample = {form, out};
    body.append(el("div", {class: "op sample"}, el("h4", {text: "samples"}), form.node, btn, out));
  }
  return card;
}

function modelX(m) {
  if (m.input.kind === "image") return rm.empty || !rm.src ? [] : [toModelInput(rm.src, m.input.shape)];
  const parts = m.ui.point.value.split(/[\s,]+/).filter(Boolean).map((s) => (/^[-+.\deE]+$/.test(s) ? Number(s) : s));
  return [parts];
}

function record(m, route, request, res) {
  (rm.last[m.name] = rm.last[m.name] || {})[route] = {request, status: res.status, response: res.data || null,
                                                       error: res.error || null};
}
function opError(out, res) {
  const empty = res.field === "x" && /empty batch/.test(res.error || "");
  out.replaceChildren(el("div", {class: "error", role: "alert", "data-testid": "op-error"},
    empty ? `Nothing drawn yet: draw a digit or upload a PNG. (${res.error})` : res.error));
  if (res.status === 404 && res.field === "name") {
    out.append(el("div", {class: "info", text: "The served models changed: click \"reload models\"."}));
  }
}

function percentileOf(ref, v) {  // share of the reference scores below v, from the histogram
  const {edges, counts} = ref.histogram, total = counts.reduce((a, b) => a + b, 0);
  if (v <= edges[0]) return 0;
  if (v >= edges[edges.length - 1]) return 1;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    if (v >= edges[i + 1]) below += counts[i];
    else { below += counts[i] * (v - edges[i]) / (edges[i + 1] - edges[i]); break; }
  }
  return below / total;
}
function histogramSvg(ref, v) {
  const W = 300, H = 90, P = 4, {edges, counts} = ref.histogram;
  const lo = Math.min(edges[0], v), hi = Math.max(edges[edges.length - 1], v);
  const span = hi - lo || 1, X = (t) => P + (W - 2 * P) * (t - lo) / span, top = Math.max(...counts) || 1;
  let s = `<svg viewBox="0 0 ${W} ${H + 16}" width="${W}" height="${H + 16}" role="img" aria-label="histogram">`;
  counts.forEach((c, i) => {
    const h = (H - 10) * c / top;
    s += `<rect x="${X(edges[i])}" y="${H - h}" width="${Math.max(1, X(edges[i + 1]) - X(edges[i]) - 0.5)}" height="${h}" class="bar"/>`;
  });
  s += `<line x1="${X(ref.threshold)}" x2="${X(ref.threshold)}" y1="0" y2="${H}" class="thr"/>`;
  s += `<line x1="${X(v)}" x2="${X(v)}" y1="0" y2="${H}" class="here"/>`;
  s += `<text x="${P}" y="${H + 13}" class="tick">${fmt(lo, 3)}</text>`;
  s += `<text x="${W - P}" y="${H + 13}" class="tick" text-anchor="end">${fmt(hi, 3)}</text></svg>`;
  const wrap = el("div", {class: "hist"});
  wrap.innerHTML = s;
  return wrap;
}
function sameOptions(a, b) {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)].filter((k) => k !== "seed"));
  return [...keys].every((k) => (a[k] ?? null) === (b[k] ?? null));
}

async function runLogLikelihood(m, x, seq) {
  const opts = m.ui.ll.form.values();
  const body = Object.assign({x}, opts);
  const res = await api(`v1/models/${encodeURIComponent(m.name)}/log-likelihood`, body);
  if (seq !== rm.seq) return;
  record(m, "log-likelihood", body, res);
  const out = m.ui.ll.out;
  if (!res.ok) return opError(out, res);
  const v = res.data.log_prob[0], unit = res.data.unit, ref = m.card && m.card.reference;
  const dims = m.input.shape.reduce((a, b) => a * b, 1);
  const calibrated = ref && !ref.error && ref.calibration &&
    sameOptions(opts, Object.assign(defaultsOf(m.operations["log-likelihood"]), ref.options));
  const kids = [el("div", {class: "big"}, calibrated ? `${ref.calibration.label} = ` : "log p(x) = ",
    el("span", {class: "value", "data-testid": "ll-value", "data-value": String(v), text: fmt(v, 6)}), ` ${unit}`)];
  if (unit === "nats" && v !== null) {
    const bpd = -v / (dims * Math.LN2);
    kids.push(el("div", {}, el("span", {"data-testid": "bpd-value", "data-value": String(bpd), text: fmt(bpd, 5)}),
      ` bits/dim (−log₂ p / ${dims} dims)`));
  }
  if (res.data.nfe !== undefined) kids.push(el("div", {class: "info", text: `${res.data.nfe} network evaluations per example`}));
  if (ref && !ref.error && v !== null) {
    const comparable = sameOptions(opts, Object.assign(defaultsOf(m.operations["log-likelihood"]), ref.options));
    if (comparable) {
      const on = v >= ref.threshold;
      kids.push(el("div", {class: `verdict ${on ? "on" : "off"}`, "data-testid": "verdict", "data-on": String(on),
        text: on ? "on-manifold" : "off-manifold"}));
      kids.push(histogramSvg(ref, v));
      const pct = 100 * percentileOf(ref, v);
      const cal = ref.calibration;  // the OOD benchmark's calibrated detector and threshold (docs/ood.md)
      kids.push(el("div", {class: "info"}, `≈ ${fmt(pct, 3)}% of ${ref.examples} training examples (${ref.data}) score lower; ` +
        (cal ? `threshold (OOD benchmark: ${cal.label || cal.detector}, ${Math.round(100 * cal.fpr_in)}% FPR on held-out data) = `
             : `threshold = ${Math.round(100 * ref.threshold_quantile)}% quantile = `),
        el("span", {"data-testid": "threshold", text: fmt(ref.threshold, 5)}), ` ${ref.unit}`));
      if (cal) kids.push(el("div", {class: "info", "data-testid": "detector",
        text: `detector: ${cal.detector} (mean AUROC ${fmt(cal.mean_auroc, 3)} over the benchmark's OOD sets)`}));
    } else {
      kids.push(el("div", {class: "info", text: "options differ from the training-set reference " +
        `(${JSON.stringify(ref.options)}): no on/off-manifold verdict`}));
    }
  } else if (ref && ref.error) {
    kids.push(el("div", {class: "info", text: `no reference histogram: ${ref.error}`}));
  }
  out.replaceChildren(...kids);
}
function defaultsOf(ospec) {
  return Object.fromEntries(Object.entries(ospec.options || {}).map(([k, s]) => [k, s.default]));
}

async function runEncode(m, x, seq) {
  const body = {x};
  const res = await api(`v1/models/${encodeURIComponent(m.name)}/encode`, body);
  if (seq !== rm.seq) return;
  record(m, "encode", body, res);
  const out = m.ui.enc.out;
  if (!res.ok) return opError(out, res);
  const z = res.data.z[0].flat(Infinity), grid = m.card && m.card.grid;
  const cell = grid ? z.map((v, j) => Math.min(grid.max[j], Math.max(grid.min[j], Math.round(v)))) : null;
  const shown = z.slice(0, 16);
  const rows = shown.map((v, j) => el("tr", {}, el("td", {text: grid && grid.labels[j] ? `${j} (${grid.labels[j]})` : String(j)}),
    el("td", {text: fmt(v, 4)}), grid ? el("td", {text: String(cell[j])}) : null));
  const kids = [];
  if (grid) kids.push(el("div", {class: "big"}, "grid cell ",
    el("span", {"data-testid": "grid-cell", "data-value": JSON.stringify(cell), text: `(${cell.join(", ")})`})));
  kids.push(el("table", {class: "latent", "data-testid": "z", "data-value": JSON.stringify(res.data.z[0])},
    el("thead", {}, el("tr", {}, el("th", {text: "dim"}), el("th", {text: "z"}), grid ? el("th", {text: "cell"}) : null)),
    el("tbody", {}, rows)));
  if (z.length > shown.length) {
    const norm = Math.sqrt(z.reduce((a, b) => a + b * b, 0));
    kids.push(el("div", {class: "info", text: `${z.length - shown.length} more dims · |z| = ${fmt(norm, 4)}`}));
  }
  out.replaceChildren(...kids);
  if (m.operations["decode"] && m.input.kind === "image") {
    const dbody = {z: res.data.z};
    const dres = await api(`v1/models/${encodeURIComponent(m.name)}/decode`, dbody);
    if (seq !== rm.seq) return;
    record(m, "decode", dbody, dres);
    if (!dres.ok) return out.append(el("div", {class: "error", role: "alert", text: `decode: ${dres.error}`}));
    const c = el("canvas", {class: "view", "data-testid": "reconstruction", title: "decode(encode(x))"});
    drawImageArray(c, dres.data.x[0], Math.max(1, Math.floor(112 / m.input.shape[1])));
    out.append(el("div", {class: "recon"}, el("div", {class: "info", text: "reconstruction decode(encode(x))"}), c));
  }
}

async function runOther(m, route, x, seq) {  // a later operation: show its answer's fields
  const body = Object.assign({x}, m.ui[route].form.values());
  const res = await api(`v1/models/${encodeURIComponent(m.name)}/${route}`, body);
  if (seq !== rm.seq) return;
  record(m, route, body, res);
  const out = m.ui[route].out;
  if (!res.ok) return opError(out, res);
  const d = res.data, kids = [], done = new Set(["model", "family", "options", "shape", "batch"]);
  const show = (k, v) => el("span", {class: "value", "data-testid": `value-${k}`, "data-value": JSON.stringify(v),
                                     text: Number.isInteger(v) ? String(v) : fmt(v, 5)});
  // a prediction and its score before and after (purify): "label 3 → 5 (changed)", "elbo_before → elbo_after"
  for (const [b, a, name] of [["label_before", "label", "label"], ["elbo_before", "elbo_after", "ELBO"]]) {
    if (!(b in d && a in d)) continue;
    const vb = d[b][0], va = d[a][0], same = JSON.stringify(vb) === JSON.stringify(va);
    kids.push(el("div", {class: "big", "data-field": name}, `${name}: before `, show(b, vb), " → after ", show(a, va),
      name === "label" ? el("span", {class: "info", text: same ? " (unchanged)" : " (changed)"}) : null,
      name === "ELBO" ? " nats" : null));
    done.add(b).add(a);
  }
  for (const [k, v] of Object.entries(d)) {
    if (done.has(k)) continue;
    const first = Array.isArray(v) ? v[0] : v;
    const isImage = Array.isArray(first) && JSON.stringify(shapeOf(first)) === JSON.stringify(m.input.shape);
    if (isImage) {
      const c = el("canvas", {class: "view", "data-testid": `image-${k}`, title: `${route}: ${k}`});
      drawImageArray(c, first, Math.max(1, Math.floor(112 / m.input.shape[1])));
      kids.push(el("div", {}, el("div", {class: "info", text: route === "purify" && k === "x" ? "purified image" : k}), c));
    } else if (Array.isArray(first) && first.length <= 32 && first.every((t) => typeof t === "number")) {
      // a short vector per example (class probabilities): one row per entry, the largest in bold
      const top = first.indexOf(Math.max(...first));
      kids.push(el("table", {class: "latent", "data-testid": `value-${k}`, "data-value": JSON.stringify(first)},
        el("thead", {}, el("tr", {}, el("th", {text: "class"}), el("th", {text: k}))),
        el("tbody", {}, first.map((t, j) => el("tr", {class: j === top ? "value" : null},
          el("td", {text: String(j)}), el("td", {text: fmt(t, 4)}))))));
    } else if (typeof first === "number" || typeof first === "string") {
      kids.push(el("div", {class: k === "label" ? "big" : null, "data-field": k},
        k === "label" ? "predicted label " : `${k}: `, show(k, first)));
    } else {
      kids.push(el("div", {"data-field": k}, `${k}: `, el("code", {text: JSON.stringify(first).slice(0, 300)})));
    }
  }
  out.replaceChildren(...kids);
}
function autoRun(ospec) { return !ospec.random && Object.keys(ospec.options || {}).length === 0; }
function shapeOf(a) { const s = []; while (Array.isArray(a)) { s.push(a.length); a = a[0]; } return s; }

async function runSample(m) {
  const opts = m.ui.sample.form.values();
  const out = m.ui.sample.out;
  out.replaceChildren(el("div", {class: "info", text: "sampling ..."}));
  const res = await api(`v1/models/${encodeURIComponent(m.name)}/sample`, opts);
  record(m, "sample", opts, res);
  if (!res.ok) return opError(out, res);
  const s = res.data.samples;
  const c = el("canvas", {class: "grid", "data-testid": "sample-grid"});
  if (m.input.kind === "image") drawGrid(c, s, Math.max(1, Math.floor(48 / m.input.shape[1])));
  else drawScatter(c, s);
  out.replaceChildren(c, el("div", {class: "info", text: `${s.length} samples · seed ${res.data.seed}` +
    (res.data.nfe !== undefined ? ` · ${res.data.nfe} network evaluations each` : "")}));
}
function drawScatter(canvas, pts) {
  canvas.width = canvas.height = 220;
  const ctx = canvas.getContext("2d");
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1] ?? 0);
  const lo = Math.min(...xs, ...ys), hi = Math.max(...xs, ...ys), S = (v) => 10 + 200 * (v - lo) / ((hi - lo) || 1);
  ctx.fillStyle = "#111"; ctx.fillRect(0, 0, 220, 220); ctx.fillStyle = "#6cf";
  pts.forEach((p) => ctx.fillRect(S(p[0]) - 1.5, 210 - S(p[1] ?? 0) + 10 - 1.5, 3, 3));
}

// ------------------------------------------------------------------ analysis of the current input
async function analyse(reason) {
  const seq = ++rm.seq;
  const t0 = reason === "stroke" ? rm.strokeEnd : performance.now();
  document.body.dataset.busy = "1";
  const jobs = [];
  for (const m of rm.models) {
    if (m.status !== "ok") continue;
    let x;
    try { x = modelX(m); } catch (exc) { showError(m.ui.error, String(exc)); continue; }
    if (m.ui.view) {
      if (x.length) drawImageArray(m.ui.view, x[0], Math.max(1, Math.floor(84 / m.input.shape[1])));
      else m.ui.view.getContext("2d").clearRect(0, 0, m.ui.view.width, m.ui.view.height);
    }
    if (m.ui.ll) jobs.push(runLogLikelihood(m, x, seq));
    if (m.ui.enc) jobs.push(runEncode(m, x, seq));
    for (const route of Object.keys(m.operations).filter((r) => !KNOWN.has(r) && autoRun(m.operations[r]))) {
      jobs.push(runOther(m, route, x, seq));
    }
  }
  await Promise.all(jobs);
  if (seq !== rm.seq) return;
  rm.timings.push({reason, ms: performance.now() - t0});
  document.body.dataset.busy = "0";
  document.body.dataset.analysed = String(seq);
}

// ------------------------------------------------------------------ start
async function loadModels() {
  showError($("list-error"), "");
  const res = await api("v1/models");
  const box = $("models");
  $("auth").hidden = res.status !== 401;
  if (!res.ok) {
    box.replaceChildren();
    showError($("list-error"), res.status === 401
      ? (apiKey() ? `The API key was refused: ${res.error}` : "This server needs an API key: enter it above.")
      : `Cannot list the models: ${res.error}`);
    return;
  }
  rm.models = res.data.models;
  const withCard = rm.models.find((m) => m.card && m.card.limits);
  rm.limits = withCard ? withCard.card.limits : null;
  box.replaceChildren(...rm.models.map(buildCard));
  const sel = $("model-filter");
  sel.replaceChildren(el("option", {value: "", text: "all models"}),
    ...rm.models.map((m) => el("option", {value: m.name, text: `${m.name} (${m.family || "?"})`})));
  applyFilter();
  rm.readyMs = rm.readyMs || performance.now();  // first listing on screen, ms since navigation start
  document.body.dataset.ready = "1";
  if (!rm.empty) analyse("reload");
}
function applyFilter() {
  const v = $("model-filter").value;
  for (const m of rm.models) m.ui.card.hidden = !!v && m.name !== v;
}

$("clear").addEventListener("click", clearPad);
$("invert").addEventListener("click", () => {
  const d = new Uint8ClampedArray(rm.src.data);
  for (let i = 0; i < d.length; i += 4) { d[i] = 255 - d[i]; d[i + 1] = 255 - d[i + 1]; d[i + 2] = 255 - d[i + 2]; d[i + 3] = 255; }
  rm.src = Object.assign({}, rm.src, {data: d});
  drawSourceOnPad();
  if (rm.src.from === "pad") rm.src = padSource();
  rm.empty = false;
  analyse("click");
});
$("analyse").addEventListener("click", () => analyse("click"));
$("upload").addEventListener("change", (ev) => { const f = ev.target.files[0]; ev.target.value = ""; if (f) onUpload(f); });
$("model-filter").addEventListener("change", applyFilter);
$("reload").addEventListener("click", loadModels);
$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  try { sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()); } catch (exc) { /* storage off */ }
  $("api-key").value = "";
  loadModels();
});
clearPad();
loadModels();
