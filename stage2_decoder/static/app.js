// samcache labelling page: plain JS, no build step. Talks to the JSON API of stage2_decoder/serve.py.
"use strict";

const COLORS = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207]];
const MASK_COLOR = [30, 144, 255];
const LABELS = { zero_shot: "zero-shot", fine_tuned: "fine-tuned" };

const state = {
  info: null, images: [], current: null, detail: null, image: null,
  prompt: { points: [], labels: [], box: null },
  results: {}, selected: {}, chosen: null, tinted: {},
  inflight: false, pending: false, drag: null, seq: 0,
};

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

function post(path, body, method = "POST") {
  return api(path, { method, headers: { "Content-Type": "application/json" },
                     body: JSON.stringify(body) });
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// ------------------------------------------------------------------ image list

function visibleImages() {
  const text = $("filter-text").value.trim().toLowerCase();
  const kind = $("filter-kind").value;
  const split = $("filter-split").value;
  return state.images.filter((im) => {
    if (text && !im.image_id.toLowerCase().includes(text)) return false;
    if (split && im.split !== split) return false;
    if (kind === "failed") return im.status !== "ok";
    if (kind === "labelled") return im.labelled > 0;
    if (kind === "unlabelled") return im.status === "ok" && im.labelled === 0;
    return true;
  });
}

function renderList() {
  const list = $("image-list");
  list.textContent = "";
  const shown = visibleImages();
  for (const im of shown) {
    const li = document.createElement("li");
    li.dataset.id = im.image_id;
    li.classList.toggle("current", im.image_id === state.current);
    const thumb = document.createElement("img");
    thumb.loading = "lazy";
    thumb.alt = "";
    thumb.src = `/api/thumb?id=${encodeURIComponent(im.image_id)}`;
    const text = document.createElement("div");
    const badges = [];
    if (im.split) badges.push(`<span class="badge">${im.split}</span>`);
    if (im.status !== "ok") badges.push(`<span class="badge failed">failed</span>`);
    else badges.push(`<span class="badge">${im.n_objects} GT</span>`);
    if (im.labelled) badges.push(`<span class="badge done">${im.labelled} labelled</span>`);
    text.innerHTML = `<div class="id"></div><div>${badges.join("")}</div>`;
    text.querySelector(".id").textContent = im.image_id;
    if (im.status !== "ok") {
      const why = document.createElement("div");
      why.className = "muted";
      why.textContent = im.error || "failed";
      text.appendChild(why);
      li.title = im.error || "";
    }
    li.append(thumb, text);
    li.addEventListener("click", () => openImage(im.image_id));
    list.appendChild(li);
  }
  $("list-count").textContent = `${shown.length} of ${state.images.length} images`;
}

async function loadImages() {
  state.images = (await api("/api/images")).images;
  const splits = [...new Set(state.images.map((im) => im.split).filter(Boolean))].sort();
  const select = $("filter-split");
  select.length = 1;
  for (const s of splits) select.add(new Option(s, s));
  renderList();
}

function step(delta) {
  const shown = visibleImages().filter((im) => im.status === "ok");
  if (!shown.length) return;
  const at = shown.findIndex((im) => im.image_id === state.current);
  const next = at < 0 ? 0 : (at + delta + shown.length) % shown.length;
  openImage(shown[next].image_id);
}

async function labelNext() {
  status("ranking unlabelled images by uncertainty…");
  const answer = await api("/api/next?limit=1");
  if (!answer.images.length) { status("every image is labelled"); return; }
  const top = answer.images[0];
  await openImage(top.image_id);
  status(`label next: ${top.image_id} (uncertainty ${top.uncertainty.toFixed(3)}; ` +
         `${answer.scored} of ${answer.unlabelled} unlabelled images ranked)`);
}

// ------------------------------------------------------------------ one image

function decoderNames() {
  const mode = $("view-mode").value;
  return mode === "both" ? state.info.decoders : [mode];
}

function buildPanels() {
  const panels = $("panels");
  panels.textContent = "";
  if (!state.image) return;
  for (const name of decoderNames()) {
    const panel = document.createElement("div");
    panel.className = "panel";
    panel.dataset.decoder = name;
    panel.innerHTML = `<h3><span>${LABELS[name] || name}</span><span class="score muted"></span></h3>
      <div class="stage"><canvas class="base"></canvas><canvas class="overlay"></canvas></div>
      <div class="choices"></div>`;
    const [base, overlay] = panel.querySelectorAll("canvas");
    for (const canvas of [base, overlay]) {
      canvas.width = state.detail.width;
      canvas.height = state.detail.height;
    }
    base.getContext("2d").drawImage(state.image, 0, 0, state.detail.width, state.detail.height);
    attachMouse(overlay, name);
    panels.appendChild(panel);
  }
  choose(state.chosen && decoderNames().includes(state.chosen) ? state.chosen
         : decoderNames()[decoderNames().length - 1]);
  drawAll();
}

function loadImageElement(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the image could not be loaded"));
    image.src = src;
  });
}

async function openImage(imageId) {
  const entry = state.images.find((im) => im.image_id === imageId);
  if (!entry) { status(`unknown image ${imageId}`, true); return; }
  state.current = imageId;
  location.hash = `id=${encodeURIComponent(imageId)}`;
  renderList();
  const li = document.querySelector(`#image-list li.current`);
  if (li) li.scrollIntoView({ block: "nearest" });
  $("image-title").textContent = imageId;
  if (entry.status !== "ok") {
    state.image = null; state.detail = null; buildPanels();
    status(`${imageId} failed in embed run: ${entry.error}`, true);
    return;
  }
  const seq = ++state.seq;
  const q = encodeURIComponent(imageId);
  const [detail, image] = await Promise.all([api(`/api/detail?id=${q}`),
                                             loadImageElement(`/api/image?id=${q}`)]);
  if (seq !== state.seq) return;  // another image was opened meanwhile
  state.detail = detail; state.image = image;
  resetPrompt();
  buildPanels();
  renderObjects();
  status(`${imageId}: ${detail.width}×${detail.height}, ${detail.ground_truth.length} ground-truth ` +
         `object(s), ${detail.objects.length} labelled`);
}

function resetPrompt() {
  state.prompt = { points: [], labels: [], box: null };
  state.results = {}; state.selected = {}; state.tinted = {};
  document.body.dataset.predictions = "0";
}

// ------------------------------------------------------------------ mouse → prompt

function imageXY(canvas, event) {
  const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * canvas.width / rect.width;
  const y = (event.clientY - rect.top) * canvas.height / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

function attachMouse(canvas, name) {
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (e) => {
    e.preventDefault();
    state.drag = { start: imageXY(canvas, e), screen: [e.clientX, e.clientY], end: null,
                   negative: e.button === 2 || e.shiftKey, canvas };
  });
  canvas.addEventListener("mousemove", (e) => {
    const drag = state.drag;
    if (!drag || drag.canvas !== canvas) return;
    if (Math.hypot(e.clientX - drag.screen[0], e.clientY - drag.screen[1]) > 5) {
      drag.end = imageXY(canvas, e);
      drawAll();
    }
  });
  canvas.addEventListener("mouseup", (e) => {
    const drag = state.drag;
    state.drag = null;
    if (!drag || drag.canvas !== canvas) return;
    choose(name);
    if (drag.end) {
      const [x0, y0] = drag.start, [x1, y1] = drag.end;
      state.prompt.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    } else {
      state.prompt.points.push(drag.start);
      state.prompt.labels.push(drag.negative ? 0 : 1);
    }
    predict();
  });
}

function hasPrompt() {
  return state.prompt.points.length > 0 || state.prompt.box !== null;
}

async function predict() {
  drawAll();
  if (!hasPrompt()) { state.results = {}; renderChoices(); drawAll(); return; }
  if (state.inflight) { state.pending = true; return; }
  state.inflight = true;
  const imageId = state.current;
  const started = performance.now();
  try {
    const answer = await post("/api/predict", { image_id: imageId, ...state.prompt });
    if (imageId !== state.current) return;
    state.results = answer.decoders;
    state.tinted = {};
    for (const [name, result] of Object.entries(answer.decoders)) {
      if (!(name in state.selected) || state.selected[name] >= result.masks.length) {
        state.selected[name] = result.best;
      }
      state.tinted[name] = await Promise.all(result.masks.map((m) => tint(m.png)));
    }
    if (imageId !== state.current) return;
    renderChoices();
    drawAll();
    document.body.dataset.predictions = String(Number(document.body.dataset.predictions || 0) + 1);
    status(`${answer.clicks} click(s) · decoder ${answer.ms} ms · round trip ` +
           `${Math.round(performance.now() - started)} ms`);
  } catch (error) {
    status(error.message, true);
  } finally {
    state.inflight = false;
    if (state.pending) { state.pending = false; predict(); }
  }
}

async function tint(pngBase64) {
  const image = await loadImageElement(`data:image/png;base64,${pngBase64}`);
  const canvas = document.createElement("canvas");
  canvas.width = image.width; canvas.height = image.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const on = data[i] > 127;
    data[i] = MASK_COLOR[0]; data[i + 1] = MASK_COLOR[1]; data[i + 2] = MASK_COLOR[2];
    data[i + 3] = on ? 120 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  return canvas;
}

function choose(name) {
  state.chosen = name;
  for (const panel of document.querySelectorAll(".panel")) {
    panel.classList.toggle("chosen", panel.dataset.decoder === name);
  }
}

function fmt(value) { return value === null || value === undefined ? "–" : value.toFixed(2); }

function renderChoices() {
  for (const panel of document.querySelectorAll(".panel")) {
    const name = panel.dataset.decoder;
    const box = panel.querySelector(".choices");
    const score = panel.querySelector(".score");
    box.textContent = "";
    score.textContent = "";
    panel.dataset.maskArea = "0";
    const result = state.results[name];
    if (!result) continue;
    result.masks.forEach((mask, k) => {
      const button = document.createElement("button");
      button.textContent = `${k + 1}: IoU pred ${fmt(mask.predicted_iou)}` +
        (mask.gt_iou === null ? "" : ` · GT ${fmt(mask.gt_iou)}`);
      button.title = `mask ${k + 1}: predicted IoU, stability ${fmt(mask.stability)}` +
        (mask.gt_iou === null ? "" : ", IoU with the ground-truth object it overlaps most");
      button.classList.toggle("selected", k === state.selected[name]);
      button.addEventListener("click", () => { state.selected[name] = k; choose(name);
                                               renderChoices(); drawAll(); });
      box.appendChild(button);
    });
    const mask = result.masks[state.selected[name]];
    panel.dataset.maskArea = String(mask.area);
    const clicks = state.prompt.points.length + (state.prompt.box ? 1 : 0);
    score.textContent = `${clicks} click(s) · area ${mask.area} px` +
      (mask.gt_iou === null ? "" : ` · IoU vs GT ${fmt(mask.gt_iou)}`);
  }
}

// ------------------------------------------------------------------ drawing

function drawAll() {
  for (const panel of document.querySelectorAll(".panel")) drawPanel(panel);
}

function drawPolygons(ctx, polygons, stroke, fill, width, dash = []) {
  ctx.save();
  ctx.setLineDash(dash);
  ctx.lineWidth = width;
  ctx.strokeStyle = stroke;
  ctx.beginPath();
  for (const polygon of polygons) {
    polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x + 0.5, y + 0.5) : ctx.moveTo(x + 0.5, y + 0.5)));
    ctx.closePath();
  }
  if (fill) { ctx.fillStyle = fill; ctx.fill("evenodd"); }
  ctx.stroke();
  ctx.restore();
}

function drawPanel(panel) {
  const canvas = panel.querySelector("canvas.overlay");
  const ctx = canvas.getContext("2d");
  const name = panel.dataset.decoder;
  const w = canvas.width, h = canvas.height;
  const line = Math.max(1.5, Math.max(w, h) / 400);
  ctx.clearRect(0, 0, w, h);
  if (!state.detail) return;
  state.detail.objects.forEach((obj, i) => {
    const [r, g, b] = COLORS[i % COLORS.length];
    drawPolygons(ctx, obj.outline, `rgb(${r},${g},${b})`, `rgba(${r},${g},${b},0.25)`, line);
  });
  if ($("show-gt").checked) {
    for (const gt of state.detail.ground_truth) {
      drawPolygons(ctx, gt.outline, "#ffd400", null, line, [4 * line, 3 * line]);
    }
  }
  const tinted = state.tinted[name];
  if (tinted && hasPrompt()) ctx.drawImage(tinted[state.selected[name]], 0, 0);
  const radius = Math.max(4, Math.max(w, h) / 90);
  state.prompt.points.forEach(([x, y], i) => {
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fillStyle = state.prompt.labels[i] ? "#1fbf4a" : "#e0312b";
    ctx.fill();
    ctx.lineWidth = line;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  });
  const box = state.drag && state.drag.end ? [...state.drag.start, ...state.drag.end] : state.prompt.box;
  if (box) {
    ctx.save();
    ctx.lineWidth = line;
    ctx.strokeStyle = "#1fbf4a";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.restore();
  }
}

// ------------------------------------------------------------------ objects

function renderObjects() {
  const list = $("objects");
  list.textContent = "";
  if (!state.detail) return;
  state.detail.objects.forEach((obj, i) => {
    const [r, g, b] = COLORS[i % COLORS.length];
    const li = document.createElement("li");
    li.dataset.id = obj.id;
    li.innerHTML = `<span class="swatch" style="background:rgb(${r},${g},${b})"></span>
      <span class="name"></span><span class="muted">${obj.area} px</span>
      <button class="redo" title="delete and click again">redo</button>
      <button class="delete" title="delete">×</button>`;
    li.querySelector(".name").textContent = `#${obj.id} ${obj.category}`;
    li.querySelector(".delete").addEventListener("click", () => deleteObject(obj.id, false));
    li.querySelector(".redo").addEventListener("click", () => deleteObject(obj.id, true));
    list.appendChild(li);
  });
  if (!state.detail.objects.length) list.innerHTML = `<li class="muted">none yet</li>`;
}

function updateCount(imageId, n) {
  const entry = state.images.find((im) => im.image_id === imageId);
  if (entry) entry.labelled = n;
  renderList();
}

async function accept() {
  if (!hasPrompt() || !state.results[state.chosen]) { status("click on an object first", true); return; }
  const imageId = state.current;
  const body = { image_id: imageId, ...state.prompt, decoder: state.chosen,
                 mask: state.selected[state.chosen], category: $("category").value };
  try {
    const answer = await post("/api/objects", body);
    state.detail.objects = answer.objects;
    updateCount(imageId, answer.objects.length);
    resetPrompt();
    renderChoices(); renderObjects(); drawAll();
    status(`saved object #${answer.object.id} (${body.category}, ${answer.object.area} px) ` +
           `from the ${LABELS[body.decoder] || body.decoder} mask`);
  } catch (error) {
    status(`not saved: ${error.message}`, true);
  }
}

async function deleteObject(objectId, redo) {
  const imageId = state.current;
  try {
    const answer = await api(`/api/objects?id=${encodeURIComponent(imageId)}&object=${objectId}`,
                             { method: "DELETE" });
    state.detail.objects = answer.objects;
    updateCount(imageId, answer.objects.length);
    if (redo) resetPrompt();
    renderChoices(); renderObjects(); drawAll();
    status(redo ? `deleted #${objectId}: click the object again` : `deleted #${objectId}`);
  } catch (error) {
    status(error.message, true);
  }
}

function renderCategories(categories, selected) {
  const select = $("category");
  const keep = selected || select.value;
  select.length = 0;
  for (const c of categories) select.add(new Option(c.name, c.name));
  if (keep && categories.some((c) => c.name === keep)) select.value = keep;
}

async function addCategory() {
  const name = $("new-category").value.trim();
  if (!name) return;
  try {
    const answer = await post("/api/categories", { name });
    renderCategories(answer.categories, name);
    $("new-category").value = "";
  } catch (error) {
    status(error.message, true);
  }
}

// ------------------------------------------------------------------ keyboard and start

function onKey(e) {
  const tag = (e.target.tagName || "").toLowerCase();
  if (tag === "input" || tag === "select" || tag === "textarea") {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  const keys = {
    ArrowRight: () => step(1), j: () => step(1), ArrowLeft: () => step(-1), k: () => step(-1),
    n: labelNext, Enter: accept, Escape: () => { resetPrompt(); renderChoices(); drawAll(); },
    Backspace: undo, z: undo, "/": () => $("filter-text").focus(),
    g: () => { $("show-gt").checked = !$("show-gt").checked; drawAll(); },
  };
  if (["1", "2", "3"].includes(e.key) && state.results[state.chosen]) {
    const k = Number(e.key) - 1;
    if (k < state.results[state.chosen].masks.length) {
      state.selected[state.chosen] = k; renderChoices(); drawAll();
    }
    e.preventDefault();
    return;
  }
  if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
}

function undo() {
  if (state.prompt.points.length) { state.prompt.points.pop(); state.prompt.labels.pop(); }
  else state.prompt.box = null;
  predict();
}

async function start() {
  state.info = await api("/api/info");
  $("cache-name").textContent = `${state.info.cache} · ${state.info.model_type} · labels: ${state.info.labels}`;
  const mode = $("view-mode");
  if (state.info.decoders.length > 1) mode.add(new Option("side by side", "both"));
  for (const name of state.info.decoders) mode.add(new Option(LABELS[name] || name, name));
  renderCategories(state.info.categories);
  mode.addEventListener("change", buildPanels);
  $("show-gt").addEventListener("change", drawAll);
  $("filter-text").addEventListener("input", renderList);
  $("filter-kind").addEventListener("change", renderList);
  $("filter-split").addEventListener("change", renderList);
  $("label-next").addEventListener("click", labelNext);
  $("accept").addEventListener("click", accept);
  $("clear").addEventListener("click", () => { resetPrompt(); renderChoices(); drawAll(); });
  $("undo").addEventListener("click", undo);
  $("add-category").addEventListener("click", addCategory);
  $("new-category").addEventListener("keydown", (e) => { if (e.key === "Enter") addCategory(); });
  document.addEventListener("keydown", onKey);
  await loadImages();
  const fromHash = decodeURIComponent((location.hash.match(/id=([^&]*)/) || [])[1] || "");
  const first = state.images.find((im) => im.image_id === fromHash) ||
                state.images.find((im) => im.status === "ok");
  if (first) await openImage(first.image_id);
  document.body.dataset.ready = "1";
}

start().catch((error) => status(`could not start: ${error.message}`, true));
