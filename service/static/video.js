// OSDFace page, video part: uploads a clip to POST v1/jobs, follows GET v1/jobs/{id} for the
// progress, then plays the restored clip (fetched as a blob, so an API key header can go with
// it) and offers it for download. Cancel sends DELETE. Independent of app.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1000;
  let job = null; // { id, timer }
  let resultUrl = null;

  function headers() {
    const key = $("opt-api-key") ? $("opt-api-key").value.trim() : "";
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function newKey() {
    // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function say(text, kind = "") {
    const el = $("video-message");
    el.textContent = text;
    el.className = `message ${kind}`.trim();
  }

  function busy(on) {
    $("video-submit").disabled = on;
    $("video-cancel").hidden = !on;
  }

  function errorText(status, payload) {
    const err = payload && payload.error;
    return err ? `${err.message} (${status} ${err.type})` : `the server answered ${status}`;
  }

  function showProgress(view) {
    const p = view.progress || {};
    const bar = $("video-progress");
    if (p.frames_total) {
      bar.max = p.frames_total;
      bar.value = p.frames_done;
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
    const parts = [`${view.state}`, `frame ${p.frames_done}${p.frames_total ? ` of ${p.frames_total}` : ""}`];
    if (p.frames_per_second) parts.push(`${p.frames_per_second.toFixed(2)} frames/s`);
    if (typeof p.eta_s === "number") parts.push(`about ${Math.ceil(p.eta_s)} s left`);
    $("video-status").textContent = parts.join(" · ");
  }

  async function showResult(view) {
    const response = await fetch(view.result, { headers: headers() });
    if (!response.ok) throw new Error(`fetching the result: ${response.status}`);
    const blob = await response.blob();
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(blob);
    const player = $("video-player");
    player.src = resultUrl;
    $("video-result").hidden = false;
    const name = $("video-input").files[0] ? $("video-input").files[0].name : "video.mp4";
    const dot = name.lastIndexOf(".");
    $("video-download").href = resultUrl;
    $("video-download").download = `${dot > 0 ? name.slice(0, dot) : name}-restored${dot > 0 ? name.slice(dot) : ".mp4"}`;
    $("video-faces").textContent = String(view.faces);
  }

  async function poll() {
    if (!job) return;
    try {
      const response = await fetch(`v1/jobs/${job.id}`, { headers: headers(), cache: "no-store" });
      const view = await response.json().catch(() => null);
      if (!response.ok) throw new Error(errorText(response.status, view));
      showProgress(view);
      if (view.state === "succeeded") {
        job = null;
        await showResult(view);
        say("Done.", "ok");
        busy(false);
        return;
      }
      if (view.state === "failed" || view.state === "cancelled") {
        job = null;
        say(view.error ? `${view.error.message} (${view.error.type})` : view.state, "error");
        busy(false);
        return;
      }
      job.timer = setTimeout(poll, POLL_MS);
    } catch (err) {
      job = null;
      say(err.message, "error");
      busy(false);
    }
  }

  async function submit(event) {
    event.preventDefault();
    const file = $("video-input").files[0];
    if (!file) {
      say("Choose a video first.", "error");
      return;
    }
    const body = new FormData();
    body.append("video", file, file.name);
    for (const [field, id] of [["start", "video-start"], ["duration", "video-duration"], ["crf", "video-crf"]]) {
      const value = $(id).value.trim();
      if (value !== "") body.append(field, value);
    }
    $("video-result").hidden = true;
    busy(true);
    say("Uploading…");
    // One key per upload: a retry after a dropped connection (here, or nginx's) is the same job.
    const submitHeaders = { ...headers(), "Idempotency-Key": newKey() };
    const send = () => fetch("v1/jobs", { method: "POST", body, headers: submitHeaders });
    try {
      const response = await send().catch(() => send());
      const view = await response.json().catch(() => null);
      if (response.status !== 202 && response.status !== 200) {
        throw new Error(errorText(response.status, view));
      }
      job = { id: view.id, timer: null };
      $("video-job").textContent = view.id;
      say("Restoring… (photos keep priority; this may take a while)");
      showProgress(view);
      job.timer = setTimeout(poll, POLL_MS);
    } catch (err) {
      say(err.message, "error");
      busy(false);
    }
  }

  async function cancel() {
    if (!job) return;
    clearTimeout(job.timer);
    const id = job.id;
    job = null;
    await fetch(`v1/jobs/${id}`, { method: "DELETE", headers: headers() }).catch(() => null);
    say("Cancelled.", "error");
    busy(false);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!$("video-form")) return;
    $("video-form").addEventListener("submit", submit);
    $("video-cancel").addEventListener("click", cancel);
  });
})();
