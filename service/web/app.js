// bindsearch web page: a query composer over POST /v1/search, with previews of every modality.
// Plain JS, no build step, nothing loaded from outside this server.
"use strict";

const MODALITIES = ["vision", "video", "audio", "text", "depth", "thermal", "imu"];
const FILE_MODALITIES = MODALITIES.filter((m) => m !== "text");
const KEY_STORAGE = "bindsearch.apiKey";
const IMU_NAMES = ["ax", "ay", "az", "gx", "gy", "gz"];
// Colour maps as stops from low to high: depth (viridis-like), thermal (inferno-like).
const PALETTES = {
  depth: [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
  thermal: [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
};
const LINE_COLOURS = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf"];

const $ = (sel, root = document) => root.querySelector(sel);
const terms = []; // {kind, li, weight: <input>, text?: <input>, file?, modality?: <select>, item?}
let resultUrls = []; // object URLs of the shown results, revoked on the next search
let generatedUrl = null; // object URL of the generated image, revoked on the next one
let termSeq = 0;

// ----------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(type, message, status) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch with the API key; a non-2xx answer becomes an ApiError from its {"error": ...} body. */
async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  let resp;
  try {
    resp = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError("network", `could not reach the server (${e.message})`, 0);
  }
  if (resp.ok) return resp;
  let type = `http_${resp.status}`;
  let message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    if (body && body.error) ({ type, message } = body.error);
  } catch (_) {
    // not JSON: keep the status line
  }
  if (resp.status === 401) $("#key-box").open = true;
  throw new ApiError(type, message, resp.status);
}

function showError(err) {
  const box = $("#error");
  box.replaceChildren();
  if (!err) {
    box.hidden = true;
    return;
  }
  const type = document.createElement("strong");
  type.textContent = err.type || "error";
  const status = err.status ? ` (HTTP ${err.status})` : "";
  box.append(type, `: ${err.message}${status}`);
  box.hidden = false;
}

async function loadInfo() {
  const out = $("#model-info");
  try {
    const info = await (await api("/v1/info")).json();
    $("#key-box").open = false; // the key (if any) works
    const total = info.indexes.reduce((n, i) => n + i.count, 0);
    const counts = info.indexes.map((i) => `${i.modality} ${i.count}`).join(", ");
    out.textContent = `${info.model.name} · ${info.model.dim}-d · ${total} items` +
      (counts ? ` (${counts})` : " (no index loaded)");
    const g = info.generator;
    $("#generator-info").textContent = g
      ? `An image from the query above, by ${g.name} (${g.image_size}×${g.image_size}; ` +
        `licence of its weights: ${g.licence}).`
      : "This server has no image generator yet (see BINDSEARCH_GENERATOR).";
  } catch (e) {
    out.textContent = `Server info unavailable: ${e.message}`;
  }
}

// ----------------------------------------------------------------------------- the composer

function addTerm(kind, init = {}) {
  const li = $("#term-template").content.firstElementChild.cloneNode(true);
  const body = $(".term-body", li);
  const n = ++termSeq;
  const t = { kind, li, weight: $(".term-weight", li) };
  li.dataset.kind = kind;
  const tag = document.createElement("span");
  tag.className = "kind";
  tag.textContent = kind;
  body.append(tag);
  if (kind === "text") {
    t.text = document.createElement("input");
    t.text.type = "text";
    t.text.className = "term-text";
    t.text.placeholder = "a red ring in the snow";
    t.text.setAttribute("aria-label", `Text of term ${n}`);
    t.text.value = init.text || "";
    body.append(t.text);
  } else if (kind === "file") {
    t.file = init.file;
    const name = document.createElement("span");
    name.className = "term-name";
    name.textContent = `${t.file.name} (${formatBytes(t.file.size)})`;
    t.modality = document.createElement("select");
    t.modality.className = "term-modality";
    t.modality.setAttribute("aria-label", `Modality of ${t.file.name}`);
    for (const m of ["", ...FILE_MODALITIES]) {
      t.modality.append(new Option(m || "auto-detect", m));
    }
    if (t.file.type.startsWith("image/")) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";
      img.src = URL.createObjectURL(t.file);
      t.thumbUrl = img.src;
      body.append(img);
    }
    body.append(name, t.modality);
  } else {
    t.item = init.item;
    const what = document.createElement("span");
    what.className = "term-name";
    const caption = t.item.caption ? ` · ${t.item.caption}` : "";
    what.textContent = `item #${t.item.id} · ${t.item.modality}${segmentText(t.item)}${caption}`;
    body.append(what);
  }
  t.weight.setAttribute("aria-label", `Weight of term ${n}`);
  if (init.weight !== undefined) t.weight.value = String(init.weight);
  $(".term-remove", li).setAttribute("aria-label", `Remove term ${n}`);
  $(".term-remove", li).addEventListener("click", () => {
    li.remove();
    terms.splice(terms.indexOf(t), 1);
    if (t.thumbUrl) URL.revokeObjectURL(t.thumbUrl);
  });
  $("#terms").append(li);
  terms.push(t);
  return t;
}

function addFiles(files) {
  for (const file of files) addTerm("file", { file });
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new ApiError("read_failed", `could not read ${file.name}`, 0));
    reader.readAsDataURL(file);
  });
}

/** The JSON body of POST /v1/search from the composer; throws an ApiError for bad input. */
async function buildRequest() {
  const active = terms.filter((t) => t.kind !== "text" || t.text.value.trim());
  if (!active.length) {
    throw new ApiError("empty_query", "add a term: type some text, drop a file, or use a result", 0);
  }
  const body = {};
  const k = parseInt($("#k").value, 10);
  if (Number.isFinite(k) && k > 0) body.k = k;
  const targets = [...document.querySelectorAll("#targets input:checked")].map((c) => c.value);
  if (targets.length) body.target = targets;
  const tags = $("#tags").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (tags.length) body.tags = tags;
  body.merge = $("#merge").value;
  const weights = active.map((t, i) => {
    const w = parseFloat(t.weight.value);
    if (!Number.isFinite(w)) {
      throw new ApiError("bad_weight", `the weight of term ${i + 1} is not a number`, 0);
    }
    return w;
  });
  if (active.length === 1 && active[0].kind === "text" && weights[0] === 1) {
    body.text = active[0].text.value.trim();
    return { body, active };
  }
  body.terms = await Promise.all(active.map(async (t, i) => {
    const weight = weights[i];
    if (t.kind === "text") return { text: t.text.value.trim(), weight };
    if (t.kind === "item") return { item_id: t.item.id, weight };
    // No guessing here: the server detects the modality from the content and the file name.
    const term = { data: await readBase64(t.file), filename: t.file.name, weight };
    if (t.modality.value) term.modality = t.modality.value;
    return term;
  }));
  return { body, active };
}

async function search(event) {
  event.preventDefault();
  const button = $("#search-button");
  const list = $("#results");
  button.disabled = true;
  button.textContent = "Searching…";
  list.setAttribute("aria-busy", "true");
  try {
    const { body, active } = await buildRequest();
    const resp = await api("/v1/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showError(null);
    renderResults(await resp.json(), active);
  } catch (e) {
    showError(e instanceof ApiError ? e : new ApiError("error", String(e), 0));
  } finally {
    button.disabled = false;
    button.textContent = "Search";
    list.removeAttribute("aria-busy");
  }
}

/** POST the composer's query to /v1/generate and show the PNG it answers. */
async function generateImage() {
  const button = $("#generate-button");
  button.disabled = true;
  button.textContent = "Generating…";
  $("#generated").setAttribute("aria-busy", "true");
  try {
    const { body } = await buildRequest();
    delete body.k; // search options: the generator takes the query, a seed and steps
    delete body.target;
    delete body.tags;
    delete body.merge;
    const seed = parseInt($("#seed").value, 10);
    body.seed = Number.isFinite(seed) && seed >= 0 ? seed : 0;
    const steps = parseInt($("#steps").value, 10);
    if (Number.isFinite(steps) && steps > 0) body.steps = steps;
    const resp = await api("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const blob = await resp.blob();
    if (generatedUrl) URL.revokeObjectURL(generatedUrl);
    generatedUrl = URL.createObjectURL(blob);
    const img = $("#generated-image");
    img.src = generatedUrl;
    img.alt = `Image generated from the query (seed ${body.seed})`;
    const by = resp.headers.get("X-Generator") || "the generator";
    $("#generated-caption").textContent = `${by} · seed ${body.seed}` +
      (body.steps ? ` · ${body.steps} steps` : "");
    $("#generated").hidden = false;
    showError(null);
  } catch (e) {
    showError(e instanceof ApiError ? e : new ApiError("error", String(e), 0));
  } finally {
    button.disabled = false;
    button.textContent = "Generate image";
    $("#generated").removeAttribute("aria-busy");
  }
}

// ----------------------------------------------------------------------------- results

const MERGE_NAMES = {
  calibrated: "by relevance",
  per_modality: "grouped by modality",
  raw: "by raw cosine",
  rrf: "by rank fusion",
};

/** Show a search answer; ``sent`` are the composer's terms, in the order of the echo. */
function renderResults(resp, sent) {
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  const q = resp.query;
  const parts = q.terms.map((t, i) => {
    const sign = t.weight < 0 ? "−" : (i ? "+" : "");
    return `${sign}${Math.abs(t.weight)} × ${describeTerm(t, sent[i])}`;
  });
  const n = resp.results.length;
  $("#echo").textContent = `${parts.join(" ")} → ${n} result${n === 1 ? "" : "s"} ` +
    `(k ${q.k}${q.target ? `, ${q.target.join("/")}` : ""}, ${MERGE_NAMES[q.merge] || q.merge}` +
    `${q.tags.length ? `, tags ${q.tags.join(", ")}` : ""}) in ${resp.took_ms.toFixed(1)} ms`;
  // Some pairs of this search are not calibrated (no calibration, or a query tower changed
  // since it was measured): the server says which, and they are ranked by raw cosine.
  const note = $("#calibration-note");
  note.textContent = resp.calibration_note ? `Not calibrated: ${resp.calibration_note}` : "";
  note.hidden = !resp.calibration_note;
  const list = $("#results");
  list.replaceChildren();
  const grouped = q.merge === "per_modality";
  let group = null;
  for (const item of resp.results) {
    if (grouped && item.modality !== group) {
      // per_modality answers each modality's list in turn: a heading before each
      group = item.modality;
      const head = document.createElement("li");
      head.className = "group";
      head.setAttribute("role", "presentation");
      const h = document.createElement("h3");
      h.textContent = group;
      head.append(h);
      list.append(head);
    }
    const li = $("#result-template").content.firstElementChild.cloneNode(true);
    li.dataset.modality = item.modality;
    li.dataset.id = String(item.id);
    $(".modality", li).textContent = item.modality;
    $(".relevance", li).textContent = `relevance ${item.relevance.toFixed(2)}`;
    $(".relevance", li).title = "calibrated relevance to the query (0 to 1), comparable " +
      "across modalities";
    $(".score", li).textContent = item.score.toFixed(3);
    $(".score", li).title = "cosine similarity (comparable only within one modality)";
    $(".segment", li).textContent = segmentText(item).replace(/^ · /, "");
    $(".caption", li).textContent = item.caption || (item.path || "").split("/").pop() || "";
    for (const tag of item.tags) {
      const t = document.createElement("li");
      t.textContent = tag;
      $(".tags", li).append(t);
    }
    const use = $(".use", li);
    use.setAttribute("aria-label", `Use as query: item ${item.id} (${item.modality})`);
    use.addEventListener("click", () => addTerm("item", { item }));
    list.append(li);
    renderPreview($(".preview", li), item);
  }
}

function describeTerm(t, local) {
  if (t.kind === "text") return `“${t.text}”`;
  if (t.kind === "item") return `item #${t.item_id} (${t.modality})`;
  const name = t.filename || (local && local.file ? local.file.name : "upload");
  return `${name} (${t.modality}, ${formatBytes(t.bytes || 0)})`;
}

function segmentText(item) {
  if (item.start == null && item.end == null) return "";
  return ` · ${formatTime(item.start || 0)}–${item.end == null ? "end" : formatTime(item.end)}`;
}

function formatTime(s) {
  const tenths = Math.round(s * 10);
  const m = Math.floor(tenths / 600);
  const rest = (tenths - 600 * m) / 10;
  const sec = Number.isInteger(rest) ? String(rest) : rest.toFixed(1);
  return `${String(m).padStart(2, "0")}:${sec.padStart(sec.includes(".") ? 4 : 2, "0")}`;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1 << 20)).toFixed(1)} MB`;
}

function note(box, text) {
  const p = document.createElement("span");
  p.className = "note";
  p.textContent = text;
  box.replaceChildren(p);
}

/** Fill a result's preview box from GET media_url (fetched with the key, shown by object URL). */
async function renderPreview(box, item) {
  if (!item.media_url) {
    note(box, item.modality === "text" ? "text" : "no media file");
    box.classList.add(item.modality === "text" ? "text-preview" : "empty");
    return;
  }
  note(box, "loading…");
  try {
    const resp = await api(item.media_url);
    const ext = (item.path || "").split(".").pop().toLowerCase();
    const type = resp.headers.get("content-type") || "";
    const label = `${item.modality} item ${item.id}`;
    if (ext === "npy") {
      const arr = parseNpy(await resp.arrayBuffer());
      if (arr && item.modality === "imu") return plotImu(box, npyChannels(arr), label);
      if (arr && (item.modality === "depth" || item.modality === "thermal")) {
        const grid = npyGrid(arr);
        if (grid) return drawMap(box, grid, item.modality, label);
      }
      return note(box, `${item.modality} (.npy): no preview`);
    }
    if (item.modality === "imu") {
      return plotImu(box, csvChannels(await resp.text(), item), label);
    }
    const blob = await resp.blob();
    if (item.modality === "depth" || item.modality === "thermal") {
      const grid = await decodeGreyPng(await blob.arrayBuffer()) || await imageGrid(blob);
      return drawMap(box, grid, item.modality, label);
    }
    const url = URL.createObjectURL(blob);
    resultUrls.push(url);
    const fragment = item.start != null || item.end != null
      ? `#t=${item.start || 0}${item.end != null ? `,${item.end}` : ""}` : "";
    let el;
    if (item.modality === "video" || (item.modality === "vision" && type.startsWith("video/"))) {
      el = document.createElement("video");
      el.controls = true;
      el.muted = true;
      el.preload = "metadata";
      el.src = url + fragment;
    } else if (item.modality === "audio") {
      el = document.createElement("audio");
      el.controls = true;
      el.preload = "metadata";
      el.src = url + fragment;
    } else {
      el = document.createElement("img");
      el.alt = item.caption || label;
      el.src = url;
    }
    el.setAttribute("aria-label", label);
    box.replaceChildren(el);
    if (el instanceof HTMLAudioElement) {
      const name = document.createElement("span");
      name.className = "note";
      name.textContent = (item.path || "").split("/").pop();
      box.prepend(name);
    }
  } catch (e) {
    note(box, `no preview: ${e.message}`);
  }
}

// ----------------------------------------------------------------------------- depth, thermal

/** {w, h, data} of a greyscale (8- or 16-bit) PNG, decoded here to keep 16-bit depth; or null. */
async function decodeGreyPng(buf) {
  const bytes = new Uint8Array(buf);
  const sig = [137, 80, 78, 71, 13, 10, 26, 10];
  if (bytes.length < 33 || sig.some((b, i) => bytes[i] !== b)) return null;
  const dv = new DataView(buf);
  let w = 0, h = 0, bits = 0, colour = -1, interlace = 0;
  const idat = [];
  for (let off = 8; off + 8 <= bytes.length;) {
    const len = dv.getUint32(off);
    const type = String.fromCharCode(...bytes.subarray(off + 4, off + 8));
    if (type === "IHDR") {
      w = dv.getUint32(off + 8);
      h = dv.getUint32(off + 12);
      bits = bytes[off + 16];
      colour = bytes[off + 17];
      interlace = bytes[off + 20];
    } else if (type === "IDAT") {
      idat.push(bytes.subarray(off + 8, off + 8 + len));
    } else if (type === "IEND") {
      break;
    }
    off += 12 + len;
  }
  if (colour !== 0 || interlace || (bits !== 8 && bits !== 16) || !w || !h) return null;
  const stream = new Blob(idat).stream().pipeThrough(new DecompressionStream("deflate"));
  const raw = new Uint8Array(await new Response(stream).arrayBuffer());
  const bpp = bits / 8;
  const stride = w * bpp;
  if (raw.length < h * (stride + 1)) return null;
  const data = new Float32Array(w * h);
  let prev = new Uint8Array(stride);
  let line = new Uint8Array(stride);
  for (let y = 0; y < h; y++) {
    const filter = raw[y * (stride + 1)];
    const src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? line[i - bpp] : 0;
      const b = prev[i];
      const c = i >= bpp ? prev[i - bpp] : 0;
      let p = 0;
      if (filter === 1) p = a;
      else if (filter === 2) p = b;
      else if (filter === 3) p = (a + b) >> 1;
      else if (filter === 4) {
        const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
        p = pa <= pb && pa <= pc ? a : (pb <= pc ? b : c);
      }
      line[i] = (src[i] + p) & 255;
    }
    for (let x = 0; x < w; x++) {
      data[y * w + x] = bpp === 2 ? (line[2 * x] << 8) | line[2 * x + 1] : line[x];
    }
    [prev, line] = [line, prev];
  }
  return { w, h, data };
}

/** {w, h, data} of any image the browser decodes (its first channel). */
async function imageGrid(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const data = new Float32Array(canvas.width * canvas.height);
  for (let i = 0; i < data.length; i++) data[i] = px[4 * i];
  return { w: canvas.width, h: canvas.height, data };
}

/** Draw a value grid stretched to its range through the modality's palette. */
function drawMap(box, grid, modality, label) {
  let lo = Infinity, hi = -Infinity;
  for (const v of grid.data) {
    if (Number.isFinite(v)) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  const span = hi > lo ? hi - lo : 1;
  const stops = PALETTES[modality];
  const canvas = document.createElement("canvas");
  canvas.width = grid.w;
  canvas.height = grid.h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(grid.w, grid.h);
  for (let i = 0; i < grid.data.length; i++) {
    const v = grid.data[i];
    const f = Number.isFinite(v) ? (v - lo) / span : 0;
    const x = f * (stops.length - 1);
    const j = Math.min(Math.floor(x), stops.length - 2);
    const r = x - j;
    for (let ch = 0; ch < 3; ch++) {
      img.data[4 * i + ch] = stops[j][ch] + r * (stops[j + 1][ch] - stops[j][ch]);
    }
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  canvas.className = "map";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${label}, ${formatNumber(lo)} to ${formatNumber(hi)}`);
  canvas.title = `${formatNumber(lo)} – ${formatNumber(hi)}`;
  box.replaceChildren(canvas);
}

function formatNumber(v) {
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

// ----------------------------------------------------------------------------- .npy, IMU

/** {shape, data} of a little-endian C-order .npy of numbers, or null. */
function parseNpy(buf) {
  const bytes = new Uint8Array(buf);
  if (bytes.length < 10 || bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") {
    return null;
  }
  const dv = new DataView(buf);
  const major = bytes[6];
  const start = major === 1 ? 10 : 12;
  const len = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const header = new TextDecoder().decode(bytes.subarray(start, start + len));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shape || /'fortran_order':\s*True/.test(header)) return null;
  const types = {
    "<f4": Float32Array, "<f8": Float64Array, "|u1": Uint8Array, "|i1": Int8Array,
    "<u2": Uint16Array, "<i2": Int16Array, "<i4": Int32Array, "<u4": Uint32Array,
  };
  const Type = types[descr[1]];
  if (!Type) return null;
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  const body = buf.slice(start + len, start + len + count * Type.BYTES_PER_ELEMENT);
  if (body.byteLength < count * Type.BYTES_PER_ELEMENT) return null;
  return { shape: dims, data: Float32Array.from(new Type(body)) };
}

function npyGrid(arr) {
  const dims = arr.shape.filter((d) => d !== 1);
  if (dims.length !== 2) return null;
  return { h: dims[0], w: dims[1], data: arr.data };
}

/** IMU channels of an array (T, C) or (C, T): the short axis is the channels. */
function npyChannels(arr) {
  if (arr.shape.length !== 2) return [];
  const [a, b] = arr.shape;
  const channelsFirst = a < b;
  const [nc, nt] = channelsFirst ? [a, b] : [b, a];
  const out = [];
  for (let c = 0; c < Math.min(nc, 6); c++) {
    const values = new Float32Array(nt);
    for (let t = 0; t < nt; t++) values[t] = arr.data[channelsFirst ? c * nt + t : t * nc + c];
    out.push({ name: nc === 6 ? IMU_NAMES[c] : `ch${c}`, values });
  }
  return out;
}

/** IMU channels of a CSV with a header row; a time column (t, time...) cuts the item's segment. */
function csvChannels(text, item) {
  const rows = text.trim().split(/\r?\n/).map((l) => l.split(","));
  if (rows.length < 2) return [];
  let names = rows[0].map((s) => s.trim());
  let body = rows.slice(1).map((r) => r.map(Number));
  if (names.every((s) => s !== "" && Number.isFinite(Number(s)))) {
    body = rows.map((r) => r.map(Number)); // no header row
    names = names.map((_, i) => `ch${i}`);
  }
  const timeCol = names.findIndex((s) => /^(t|time|timestamp|ts|seconds?)$/i.test(s));
  if (timeCol >= 0 && (item.start != null || item.end != null)) {
    const lo = item.start ?? -Infinity, hi = item.end ?? Infinity;
    const cut = body.filter((r) => r[timeCol] >= lo && r[timeCol] <= hi);
    if (cut.length > 1) body = cut;
  }
  const out = [];
  names.forEach((name, c) => {
    if (c === timeCol || out.length >= 6) return;
    out.push({ name, values: Float32Array.from(body, (r) => r[c]) });
  });
  return out;
}

/** A small line plot: each channel in its own strip, scaled to its own range. */
function plotImu(box, channels, label) {
  if (!channels.length || !channels[0].values.length) return note(box, "imu: nothing to plot");
  const w = 240, h = 150, left = 22;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  const strip = h / channels.length;
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  channels.forEach((ch, i) => {
    const top = i * strip;
    let lo = Infinity, hi = -Infinity;
    for (const v of ch.values) {
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    const span = hi > lo ? hi - lo : 1;
    const colour = LINE_COLOURS[i % LINE_COLOURS.length];
    ctx.fillStyle = colour;
    ctx.fillText(ch.name, 2, top + strip / 2);
    ctx.strokeStyle = "#eee";
    ctx.beginPath();
    ctx.moveTo(left, top + strip - 0.5);
    ctx.lineTo(w, top + strip - 0.5);
    ctx.stroke();
    ctx.strokeStyle = colour;
    ctx.beginPath();
    const n = ch.values.length;
    ch.values.forEach((v, t) => {
      const x = left + (n > 1 ? (t / (n - 1)) * (w - left - 2) : 0);
      const y = top + 2 + (1 - ((Number.isFinite(v) ? v : lo) - lo) / span) * (strip - 4);
      if (t) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  canvas.className = "plot";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${label}: ${channels.map((c) => c.name).join(", ")}`);
  box.replaceChildren(canvas);
}

// ----------------------------------------------------------------------------- wiring

function init() {
  const targets = $("#targets");
  for (const m of MODALITIES) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "target";
    box.value = m;
    label.append(box, ` ${m}`);
    targets.append(label);
  }
  const key = $("#api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (key.value) localStorage.setItem(KEY_STORAGE, key.value);
    else localStorage.removeItem(KEY_STORAGE);
    loadInfo();
  });
  $("#add-text").addEventListener("click", () => addTerm("text").text.focus());
  const input = $("#file-input");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  // Files dropped anywhere on the page become terms (and never navigate away).
  const zone = $("#drop-zone");
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) zone.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
  });
  $("#composer").addEventListener("submit", search);
  $("#generate-button").addEventListener("click", generateImage);
  addTerm("text").text.focus();
  loadInfo();
}

init();
