// OSDFace page: posts the photo to /restore (Accept: application/json), shows the result over the
// original with a slider, outlines the faces from the returned boxes, lists the timings.
// While it works it says what is happening: upload progress, then "restoring" with the elapsed
// time and the server's queue estimate (/v1/queue). Readiness is polled all the time: the button
// is off, with the server's reason, whenever the server cannot take work.
// Plain browser JavaScript, no build step. Paths are relative so the page works under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

const READY_POLL_MS = 5000;
const QUEUE_POLL_MS = 1000;

// Object URLs of the current run, released when the next one starts.
let objectUrls = [];
// What the server said last: ready or not, why not, and its upload limit (from /v1/info).
const server = { ready: false, reason: "checking the service…", maxUploadBytes: null };
let busy = false;

function releaseUrls() {
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
}

function keepUrl(blob) {
  const url = URL.createObjectURL(blob);
  objectUrls.push(url);
  return url;
}

function setMessage(text, kind = "") {
  const el = $("message");
  el.textContent = text;
  el.className = `message ${kind}`.trim();
}

function setBusy(value) {
  busy = value;
  updateButton();
}

// The button works only when the server is ready and no run is in progress.
function updateButton() {
  const button = $("submit");
  button.disabled = busy || !server.ready;
  button.textContent = busy ? "Restoring…" : "Restore";
  button.title = server.ready ? "" : server.reason;
}

function loaded(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not display this image"));
    img.src = src;
  });
}

function base64ToBlob(b64, type) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], { type });
}

function formatSeconds(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "–";
  return s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

function buildForm(file) {
  const body = new FormData();
  body.append("image", file, file.name);
  if ($("opt-aligned").checked) body.append("aligned", "true");
  if ($("opt-center").checked) body.append("only_center_face", "true");
  const strength = $("opt-strength").value;
  if (Number(strength) !== 1) body.append("strength", strength);
  if ($("opt-upscale").value) body.append("upscale", $("opt-upscale").value);
  if ($("opt-background").value !== "none") body.append("background", $("opt-background").value);
  if ($("opt-format").value) body.append("output_format", $("opt-format").value);
  if ($("opt-quality").value) body.append("quality", $("opt-quality").value);
  return body;
}

// "2" when every face found was restored, else "1 of 2" (faces, max_faces ... chose some).
function facesText(restored, detected) {
  return restored === detected ? String(detected) : `${restored} of ${detected}`;
}

function doneText(restored, detected) {
  const faces = (n) => `${n} face${n === 1 ? "" : "s"}`;
  if (detected === 0) return "No face found: the photo is unchanged.";
  if (restored === 0) return `None of the ${faces(detected)} found was chosen: photo unchanged.`;
  if (restored === detected) return `Restored ${faces(restored)}.`;
  return `Restored ${restored} of ${faces(detected)}.`;
}

function errorText(status, payload) {
  const err = payload && payload.error;
  if (err && err.message) return `${err.message} (${err.type || "error"}, HTTP ${status})`;
  return `The server answered HTTP ${status}.`;
}

// Face boxes are in input pixels, so the overlay's coordinate system is the original's size.
function drawFaces(faces, width, height) {
  const svg = $("faces");
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const stroke = Math.max(2, Math.round(Math.max(width, height) / 300));
  faces.forEach((face, i) => {
    const [x1, y1, x2, y2] = face.box;
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("x", x1);
    rect.setAttribute("y", y1);
    rect.setAttribute("width", Math.max(0, x2 - x1));
    rect.setAttribute("height", Math.max(0, y2 - y1));
    rect.setAttribute("stroke-width", stroke);
    rect.setAttribute("class", "face-box");
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `face ${i + 1}, score ${Number(face.score).toFixed(3)}`;
    rect.appendChild(title);
    const label = document.createElementNS(SVG_NS, "text");
    label.setAttribute("x", x1 + stroke);
    label.setAttribute("y", Math.max(y1 - stroke * 2, stroke * 8));
    label.setAttribute("font-size", stroke * 8);
    label.setAttribute("class", "face-label");
    label.textContent = String(i + 1);
    svg.append(rect, label);
  });
}

// How the server's times nest (docs/api.md): all are parts of "total"; decode, detect and align
// run before the faces are queued, "inference" is the model calls and holds the model stages,
// background, paste and encode come after it. A stage not named here is listed after them.
const MODEL_STAGES = ["vre", "vae_encode", "unet", "vae_decode"];
const BEFORE_MODEL = ["decode", "detect", "align"];

function fillTimings(timings, roundTrip) {
  const stages = timings.stages || {};
  const rows = [
    ["round trip (browser)", roundTrip, 0],
    ["total (server)", timings.total, 0],
  ];
  const addStages = (names, level) =>
    names.filter((name) => name in stages).forEach((name) => rows.push([name, stages[name], level]));
  addStages(BEFORE_MODEL, 1);
  rows.push(["queue", timings.queue, 1], ["inference", timings.inference, 1]);
  addStages(MODEL_STAGES, 2);
  const known = new Set([...BEFORE_MODEL, ...MODEL_STAGES]);
  addStages(Object.keys(stages).filter((name) => !known.has(name)), 1);
  const tbody = $("timings").tBodies[0];
  tbody.replaceChildren();
  rows.forEach(([name, s, level]) => {
    const tr = tbody.insertRow();
    tr.className = `level-${level}`;
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = formatSeconds(s);
  });
}

function downloadName(file, contentType) {
  const ext = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/heic": "heic",
    "image/avif": "avif",
  }[contentType] || "img";
  const stem = file.name.replace(/\.[^.]+$/, "") || "photo";
  return `${stem}-restored.${ext}`;
}

async function showResult(file, payload, roundTrip) {
  const result = $("result");
  result.hidden = false;
  result.dataset.state = "loading";
  const restored = base64ToBlob(payload.image, payload.content_type);
  const afterUrl = keepUrl(restored);
  // Most browsers cannot show HEIC: without both pictures there is no before/after view, but
  // the details and the restored file (Download) are still the result.
  const shown = await Promise.all([
    loaded($("before"), keepUrl(file)),
    loaded($("after"), afterUrl),
  ]).then(
    () => true,
    () => false,
  );
  $("compare").hidden = !shown;
  document.querySelectorAll(".slider-label").forEach((el) => {
    el.hidden = !shown;
  });
  if (shown) drawFaces(payload.faces || [], $("before").naturalWidth, $("before").naturalHeight);
  $("faces-count").textContent = facesText(payload.faces_restored, payload.faces_detected);
  $("result-size").textContent = `${payload.width} × ${payload.height}`;
  $("result-format").textContent = payload.content_type;
  fillTimings(payload.timings || {}, roundTrip);
  const link = $("download");
  link.href = afterUrl;
  link.download = downloadName(file, payload.content_type);
  result.dataset.state = "done";
  return shown;
}

function sizeProblem(file) {
  const limit = server.maxUploadBytes;
  if (limit && file.size > limit) {
    const mib = (n) => (n / 1048576).toFixed(1);
    return `${file.name} is ${mib(file.size)} MiB; this server takes at most ${mib(limit)} MiB.`;
  }
  return "";
}

// POST with upload progress (fetch cannot report it). Resolves to {status, payload}.
function postWithProgress(body, headers, onUploaded) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "restore");
    Object.entries(headers).forEach(([k, v]) => xhr.setRequestHeader(k, v));
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setMessage(`Uploading… ${Math.round((100 * e.loaded) / e.total)}%`);
    };
    xhr.upload.onload = onUploaded;
    xhr.onload = () => {
      let payload = null;
      try {
        payload = JSON.parse(xhr.responseText);
      } catch {
        payload = null;
      }
      resolve({ status: xhr.status, payload });
    };
    xhr.onerror = () => reject(new Error("the connection failed"));
    xhr.send(body);
  });
}

// "Restoring… 3 s" with the server's estimate, refreshed until the returned stop() is called.
function startRestoringStatus() {
  const started = performance.now();
  let estimate = "";
  let stopped = false;
  const render = () => {
    if (stopped) return;
    const elapsed = Math.round((performance.now() - started) / 1000);
    setMessage(`Restoring… ${elapsed} s${estimate}`);
  };
  const poll = async () => {
    const q = await fetch("v1/queue", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : null))
      .catch(() => null);
    if (q && q.predicted_wait_s) {
      const n = q.queued_faces;
      const ahead = n ? `${n} face${n === 1 ? "" : "s"} queued; ` : "";
      estimate = ` (${ahead}a new face takes about ${Math.ceil(q.predicted_wait_s)} s now)`;
    }
    render();
  };
  render();
  poll();
  const timers = [setInterval(render, 250), setInterval(poll, QUEUE_POLL_MS)];
  return () => {
    stopped = true;
    timers.forEach(clearInterval);
  };
}

async function restore(event) {
  event.preventDefault();
  const file = $("image-input").files[0];
  if (!file) {
    setMessage("Choose a photo first.", "error");
    return;
  }
  const tooBig = sizeProblem(file);
  if (tooBig) {
    setMessage(tooBig, "error");
    return;
  }
  releaseUrls();
  setBusy(true);
  setMessage(`Uploading ${file.name}…`);
  // The previous result goes away: a failed run must not leave it on screen as if current.
  $("result").hidden = true;
  $("result").dataset.state = "pending";
  const headers = { Accept: "application/json" };
  const key = $("opt-api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const started = performance.now();
  let stopStatus = () => {};
  try {
    const { status, payload } = await postWithProgress(buildForm(file), headers, () => {
      stopStatus = startRestoringStatus();
    });
    stopStatus();
    const roundTrip = (performance.now() - started) / 1000;
    if (status < 200 || status >= 300 || !payload) {
      $("result").dataset.state = "error";
      setMessage(errorText(status, payload), "error");
      return;
    }
    const shown = await showResult(file, payload, roundTrip);
    const done = doneText(payload.faces_restored, payload.faces_detected);
    const unseen = shown ? "" : " This browser cannot display the picture's format: use Download.";
    setMessage(done + unseen, "ok");
  } catch (err) {
    stopStatus();
    $("result").dataset.state = "error";
    setMessage(`Request failed: ${err.message}`, "error");
  } finally {
    setBusy(false);
  }
}

function moveSlider() {
  const pos = $("slider").value;
  $("compare").style.setProperty("--pos", `${pos}%`);
}

function pickFile(file) {
  $("drop-text").textContent = file ? `${file.name} (${Math.round(file.size / 1024)} KiB)` : "";
  const tooBig = file ? sizeProblem(file) : "";
  setMessage(tooBig, tooBig ? "error" : "");
}

function setUpDrop() {
  const zone = $("drop-zone");
  const input = $("image-input");
  input.addEventListener("change", () => pickFile(input.files[0]));
  ["dragenter", "dragover"].forEach((type) =>
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    }),
  );
  ["dragleave", "drop"].forEach((type) =>
    zone.addEventListener(type, () => zone.classList.remove("dragging")),
  );
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (!e.dataTransfer.files.length) return;
    input.files = e.dataTransfer.files;
    pickFile(input.files[0]);
  });
}

// Readiness badge, polled all the time: loading, failed (with the server's reason), draining.
async function checkReady() {
  const badge = $("service-status");
  try {
    const response = await fetch("readyz", { cache: "no-store" });
    const payload = await response.json().catch(() => null);
    if (response.ok) {
      if (!server.ready) await describeServer(badge);
      server.ready = true;
      badge.dataset.ready = "true";
    } else {
      const err = (payload && payload.error) || {};
      server.ready = false;
      server.reason = err.message || `HTTP ${response.status}`;
      badge.dataset.ready = err.type === "not_ready" ? "loading" : "false";
      badge.dataset.reason = err.type || "";
      const label = {
        not_ready: "loading the model…",
        shutting_down: "shutting down",
      }[err.type] || "not ready";
      // A failed load's reason is the server's own sentence ("loading the model failed: ...").
      badge.textContent = err.type === "model_failed" ? server.reason : label;
    }
  } catch {
    server.ready = false;
    server.reason = "the service does not answer";
    badge.dataset.ready = "false";
    badge.dataset.reason = "unreachable";
    badge.textContent = "service unreachable";
  }
  updateButton();
  setTimeout(checkReady, READY_POLL_MS);
}

async function describeServer(badge) {
  const info = await fetch("v1/info").then((r) => (r.ok ? r.json() : null)).catch(() => null);
  const model = (info && info.model) || {};
  server.maxUploadBytes = (info && info.limits && info.limits.max_upload_bytes) || null;
  badge.textContent = model.device ? `ready · ${model.device}${model.dtype ? ` · ${model.dtype}` : ""}` : "ready";
  // Only the background networks this server loaded can be chosen.
  const loaded = Object.keys(model.backgrounds || {});
  for (const option of $("opt-background").options) {
    option.disabled = option.value !== "none" && !loaded.includes(option.value);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("restore-form").addEventListener("submit", restore);
  $("slider").addEventListener("input", moveSlider);
  $("opt-strength").addEventListener("input", () => {
    $("opt-strength-value").textContent = Number($("opt-strength").value).toFixed(2);
  });
  $("show-faces").addEventListener("change", () => {
    $("faces").classList.toggle("hidden", !$("show-faces").checked);
  });
  setUpDrop();
  moveSlider();
  updateButton();
  checkReady();
});
