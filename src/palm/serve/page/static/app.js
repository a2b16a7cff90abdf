// palm serve's page: each dropped photograph is posted to /v1/predict (this machine's service
// only, a few at a time) and its card filled with the answer. No external script, style or font.
"use strict";
const CONCURRENT = 2;          // requests in flight at once
const results = document.getElementById("results");
const progress = document.getElementById("progress");
const count = document.getElementById("count");
let total = 0, done = 0;
let token = sessionStorage.getItem("palm-serve-token");
let asking = null;

// The service's API, with its access token when it asks for one (401): the person types it once
// (kept for this tab only, sessionStorage) and the request is sent again.
async function api(url, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers, token ? { Authorization: `Bearer ${token}` } : {});
    const resp = await fetch(url, Object.assign({}, options, { headers }));
    if (resp.status !== 401) return resp;
    await askToken(token ? "That token was not accepted; type it again." : "");
  }
}

function askToken(message) {
  if (asking) return asking;
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  document.getElementById("token-message").textContent = message;
  form.hidden = false;
  input.focus();
  asking = new Promise(resolve => {
    form.onsubmit = e => {
      e.preventDefault();
      token = input.value.trim();
      sessionStorage.setItem("palm-serve-token", token);
      input.value = "";
      form.hidden = true;
      asking = null;
      resolve();
    };
  });
  return asking;
}

// a card field shown only when it is text or a number (never "[object Object]")
function text(value) {
  return typeof value === "string" || typeof value === "number" ? String(value) : null;
}

// The header: the model that answers (/healthz: its version and threshold) and, from its description
// (/v1/model: a model card, palm-model-card/1, or what model.json says), its name and network.
function describe(health, card) {
  card = card && typeof card === "object" ? card : {};
  const isCard = card.model !== null && typeof card.model === "object";
  const network = text(isCard ? card.model.network : card.model);
  const threshold = health.threshold ?? (isCard ? (card.decision || {}).threshold : card.threshold);
  const name = text(card.name);
  const version = text(health.model) || text(card.version);
  return `Model ${[name, network].filter(Boolean).join(", ") || "(unnamed)"}` + (version ? ` (version ${version})` : "")
    + (text(threshold) != null ? `; PM when the probability is at least ${Number(threshold).toFixed(3)}` : "");
}

async function header() {
  const line = document.getElementById("model");
  try {
    const health = await (await fetch("/healthz")).json();
    let card = null;
    try {
      const resp = await api("/v1/model");
      if (resp.ok) card = await resp.json();
    } catch (e) { /* the version and threshold are enough */ }
    line.textContent = describe(health, card);
  } catch (e) {
    line.textContent = "model description unavailable";
  }
}
header();

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function addCard(file) {
  const card = el("section", "card pending");
  card.dataset.name = file.name;
  card.append(el("h2", null, file.name));
  const img = el("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);        // a local preview until the overlay comes
  card.append(img);
  const dl = el("dl");
  card.append(dl);
  card.append(el("p", "small status", "waiting…"));
  results.append(card);
  return card;
}

function row(dl, term, value, cls) {
  const dd = el("dd", cls, value);
  dl.append(el("dt", null, term), dd);
  return dd;
}

function fill(card, r) {
  const dl = card.querySelector("dl");
  dl.replaceChildren();
  const status = card.querySelector(".status");
  if (r.error) {
    row(dl, "Error", r.error, "error").dataset.field = "error";
    status.textContent = "This file could not be read as a photograph.";
  } else {
    const gradable = r.quality === "ok";
    row(dl, "Gradability", gradable ? "gradable" : `not gradable: ${r.quality}`,
        gradable ? "" : "ungradable").dataset.field = "quality";
    if (r.probability != null) {
      row(dl, "PM probability", Number(r.probability).toFixed(3)).dataset.field = "probability";
      row(dl, "Decision", r.diagnosis, r.diagnosis === "PM" ? "pm" : "nonpm").dataset.field = "diagnosis";
      status.textContent = r.gradcam ? "Grad-CAM: red = where the model found the most evidence for its decision."
                                     : "No Grad-CAM overlay for this model folder.";
    } else {
      row(dl, "Decision", "none (retake the photograph)", "ungradable").dataset.field = "diagnosis";
      status.textContent = "Not a gradable fundus photograph: no probability is given.";
    }
    if (r.gradcam) card.querySelector("img").src = r.gradcam;
  }
  card.append(el("p", "small notice-line", "Research aid, not a diagnosis."));
  card.classList.remove("pending");
  card.dataset.state = "done";
}

function fail(card, message) {
  const dl = card.querySelector("dl");
  dl.replaceChildren();
  row(dl, "Error", message, "error").dataset.field = "error";
  card.querySelector(".status").textContent = "";
  card.classList.remove("pending");
  card.dataset.state = "done";
}

function tick() {
  progress.hidden = false;
  progress.max = total;
  progress.value = done;
  count.textContent = done < total ? `${done} of ${total} done…` : `${done} of ${total} done`;
}

async function send(file, card) {
  card.querySelector(".status").textContent = "scoring…";
  const body = new FormData();
  body.append("files", file, file.name);
  try {
    const resp = await api("/v1/predict?gradcam=true", { method: "POST", body });
    const answer = await resp.json();
    if (!resp.ok) fail(card, answer.detail || `HTTP ${resp.status}`);
    else fill(card, answer.results[0]);
  } catch (e) {
    fail(card, `the service did not answer (${e})`);
  }
  done += 1;
  tick();
}

async function handle(files) {
  const jobs = Array.from(files).map(f => [f, addCard(f)]);
  total += jobs.length;
  tick();
  const workers = Array.from({ length: CONCURRENT }, async () => {
    while (jobs.length) { const [f, c] = jobs.shift(); await send(f, c); }
  });
  await Promise.all(workers);
}

const drop = document.getElementById("drop");
const input = document.getElementById("files");
input.addEventListener("change", () => { handle(input.files); input.value = ""; });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); handle(e.dataTransfer.files); });
