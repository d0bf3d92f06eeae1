// lesionflow web page: plain JavaScript against the service's own endpoints
// (GET /model, POST /classify, POST /gradcam), the same ones an API client uses. Every call carries
// the API token the person gave (kept for this tab only: sessionStorage); a 401 asks for it.
"use strict";

const TOKEN_KEY = "lesionflow.token";
let tokenWanted = null;  // resolves with the token once the person gives it

function askToken(reason) {
  $("auth-reason").textContent = reason || "This service answers only with an API token.";
  $("auth").hidden = false;
  $("token").focus();
  if (!tokenWanted) {
    tokenWanted = new Promise((resolve) => {
      $("auth").addEventListener("submit", (ev) => {
        ev.preventDefault();
        const token = $("token").value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        $("token").value = "";
        $("auth").hidden = true;
        tokenWanted = null;
        resolve(token);
      }, { once: true });
    });
  }
  return tokenWanted;
}

// fetch() with the token; on 401 the person is asked for one and the call is made again; on 503
// (the service is busy) it is made again after the Retry-After the service asked for, twice at most
async function api(path, init = {}, tries = 3) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = new Headers(init.headers || {});
  if (token) headers.set("Authorization", "Bearer " + token);
  const body = typeof init.body === "function" ? init.body() : init.body;
  const r = await fetch(path, { ...init, headers, body });
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    let reason = "This service answers only with an API token.";
    try { reason = (await r.json()).error || reason; } catch (_) { /* not JSON */ }
    await askToken(token ? "The token was refused: " + reason : reason);
    return api(path, init, tries);
  }
  if (r.status === 503 && tries > 1) {
    const wait = Math.min(10, Number(r.headers.get("Retry-After")) || 2);
    await new Promise((ok) => setTimeout(ok, 1000 * wait));
    return api(path, init, tries - 1);
  }
  return r;
}

// a thumbnail of a training case: fetched with the token (an <img src> cannot send it)
async function showThumbnail(img, url) {
  try {
    const r = await api(url);
    if (r.ok) img.src = URL.createObjectURL(await r.blob());
  } catch (_) { /* the caption still names the case */ }
}

const DX_NAMES = {
  akiec: "Actinic keratosis / intraepithelial carcinoma",
  bcc: "Basal cell carcinoma",
  bkl: "Benign keratosis",
  df: "Dermatofibroma",
  mel: "Melanoma",
  nv: "Melanocytic nevus",
  vasc: "Vascular lesion",
};
const RISK_NAMES = { benign: "benign", benign_at_risk: "benign-at-risk", malignant: "malignant" };

const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + "%";
const riskName = (c) => RISK_NAMES[c] || String(c).replace(/_/g, "-");

let chosen = null; // the File to send
let previewUrl = null;
let overlayUrl = null;

function fillSelect(select, values) {
  for (const v of values || []) {
    if (v === "unknown") continue; // "not given" already means unknown
    const opt = document.createElement("option");
    opt.value = v;
    opt.textContent = v;
    select.appendChild(opt);
  }
}

function fillSites(sites) {
  // the sites recorded with the model (lesionflow site add): a request naming one is decided at its threshold
  const select = $("site");
  for (const s of sites) {
    const opt = document.createElement("option");
    opt.value = s.name;
    opt.textContent = s.name + (s.suitable ? " (threshold " + pct(s.threshold) + ")" : " (not suitable: no decision)");
    select.appendChild(opt);
  }
  $("site-field").hidden = sites.length === 0;
}

let similarK = 0;  // similar confirmed cases shown under a result (0: the model has no index)

function renderSimilar(cases) {
  const section = $("similar"), grid = $("similar-grid");
  grid.textContent = "";
  if (!cases || !cases.length) {
    section.hidden = true;
    return;
  }
  for (const c of cases) {
    const li = document.createElement("li");
    li.className = "case";
    li.tabIndex = 0;  // keyboard: Tab moves from case to case, each read out whole
    li.dataset.dx = c.dx;
    const label = (DX_NAMES[c.dx] || c.diagnosis) + ", confirmed by " + c.confirmation +
      ", similarity " + pct(c.similarity);
    li.setAttribute("aria-label", label);
    const img = document.createElement("img");
    img.alt = "Training case " + c.image_id + ": " + (DX_NAMES[c.dx] || c.diagnosis);
    showThumbnail(img, c.thumbnail_url);
    const caption = document.createElement("div");
    caption.className = "case-caption";
    const dx = document.createElement("strong");
    dx.textContent = DX_NAMES[c.dx] || c.diagnosis;
    const how = document.createElement("span");
    how.textContent = c.confirmation;
    const sim = document.createElement("span");
    sim.className = "case-similarity";
    sim.textContent = "similarity " + pct(c.similarity);
    caption.append(dx, how, sim);
    li.append(img, caption);
    grid.appendChild(li);
  }
  section.hidden = false;
}

async function loadModelInfo() {
  try {
    const r = await api("/model");
    if (!r.ok) throw new Error("HTTP " + r.status);
    const info = await r.json();
    $("model-tag").textContent = info.model_tag;
    $("data-version").textContent = info.data_version;
    $("model-threshold").textContent = pct(info.threshold) + " malignancy probability";
    if (info.disclaimer) $("disclaimer").textContent = info.disclaimer;
    const fields = info.metadata_fields || {};
    fillSelect($("sex"), fields.sex);
    fillSelect($("localization"), fields.localization);
    similarK = info.similar_cases ? info.similar_cases.k : 0;
    fillSites(info.sites || []);
    for (const dx of (info.classes && info.classes.dx) || []) {
      const opt = document.createElement("option");
      opt.value = dx;
      opt.textContent = DX_NAMES[dx] || dx;
      $("disagree-dx").appendChild(opt);
    }
  } catch (e) {
    $("model-tag").textContent = "unavailable (" + e.message + ")";
    $("data-version").textContent = "unavailable";
    $("model-threshold").textContent = "unavailable";
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = "";
  const strong = document.createElement("strong");
  strong.textContent = "The image was not analysed. ";
  box.appendChild(strong);
  box.appendChild(document.createTextNode(message));
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function choose(file) {
  if (!file) return;
  chosen = file;
  const kb = Math.max(1, Math.round(file.size / 1024));
  $("file-name").textContent = "Selected: " + file.name + " (" + kb.toLocaleString() + " KB)";
  $("submit").disabled = false;
  clearError();
}

function setBusy(busy) {
  $("submit").disabled = busy || !chosen;
  $("form").setAttribute("aria-busy", busy ? "true" : "false");
  $("status").textContent = busy ? "Analysing the image…" : "";
  $("status").classList.toggle("busy", busy);
}

function formData() {
  const fd = new FormData();
  fd.append("image", chosen, chosen.name);
  for (const k of ["age", "sex", "localization", "site"]) {
    const v = $(k).value.trim();
    if (v !== "") fd.append(k, v);
  }
  return fd;
}

async function errorText(r) {
  // the service's own JSON error ({"error": ..., "field": ..., "status": ...}), else the raw text
  const text = await r.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return "HTTP " + r.status + (text ? ": " + text.slice(0, 300) : "");
}

function renderBars(probs) {
  const list = $("dx-bars");
  list.textContent = "";
  if (!probs) {
    const li = document.createElement("li");
    li.textContent = "This model does not predict the seven diagnoses.";
    list.appendChild(li);
    return;
  }
  const top = Object.keys(probs).reduce((a, b) => (probs[a] >= probs[b] ? a : b));
  for (const [code, p] of Object.entries(probs)) {
    const li = document.createElement("li");
    li.className = "bar-row" + (code === top ? " is-top" : "");
    li.dataset.dx = code;
    const name = document.createElement("span");
    name.className = "bar-name";
    name.textContent = (DX_NAMES[code] || code) + " ";
    const abbr = document.createElement("span");
    abbr.className = "bar-code";
    abbr.textContent = "(" + code + ")";
    name.appendChild(abbr);
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = pct(p);
    li.append(name, track, value);
    list.appendChild(li);
  }
}

function isWithheld(res) {
  // refused by an image-quality check, or out of distribution: the service gave no risk estimate
  return res.in_distribution === false || (Array.isArray(res.quality_reasons) && res.quality_reasons.length > 0);
}

function renderWithheld(res) {
  // the model cannot judge this image: no risk class, no probability, no referral box
  $("ood-message").textContent = res.message.replace(/^./, (c) => c.toUpperCase()) + ".";
  $("ood-detail").textContent =
    res.quality_reasons && res.quality_reasons.length
      ? " (image-quality check)"
      : " (out-of-distribution score " + res.ood_score.toFixed(2) + ", threshold " + res.ood_threshold.toFixed(2) + ")";
  $("ood-warning").hidden = false;
  $("summary").hidden = true;
  $("model-tag").textContent = res.model_tag;
  $("data-version").textContent = res.data_version;
}

let answerId = null;  // the request_id of the answer shown, for a disagreement

function resetDisagree(res) {
  answerId = res.request_id || null;
  $("disagree").hidden = !answerId;
  $("disagree-dx").value = "";
  $("disagree-note").value = "";
  $("disagree-status").textContent = "";
  $("disagree-submit").disabled = false;
}

async function disagree(ev) {
  ev.preventDefault();
  const dx = $("disagree-dx").value;
  if (!answerId || !dx) {
    $("disagree-status").textContent = "Choose your diagnosis first.";
    return;
  }
  $("disagree-submit").disabled = true;
  try {
    const r = await api("/dispute", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: answerId, dx: dx, note: $("disagree-note").value }),
    });
    $("disagree-status").textContent = r.ok
      ? "Recorded: " + (DX_NAMES[dx] || dx) + "."
      : "Not recorded: " + (await errorText(r));
  } catch (e) {
    $("disagree-status").textContent = "Not recorded: the service could not be reached (" + e.message + ").";
  } finally {
    $("disagree-submit").disabled = false;
  }
}

function renderResult(res) {
  resetDisagree(res);
  $("ood-warning").hidden = true;
  $("summary").hidden = false;
  renderSimilar(res.similar);  // none for an image the model cannot judge
  if (isWithheld(res)) {
    renderWithheld(res);
    return;
  }
  const risk = res.risk_class;
  const riskBox = $("risk");
  riskBox.className = "risk risk-" + (risk || "none");
  if (risk) {
    $("risk-class").textContent = riskName(risk);
    $("risk-prob").textContent = "probability " + pct(res.risk_probabilities[risk]);
  } else {
    $("risk-class").textContent = "n/a";
    $("risk-prob").textContent = "this model does not predict risk classes";
  }

  const p = res.p_malignant, t = res.threshold;
  $("gauge-fill").style.width = (100 * p).toFixed(1) + "%";
  $("gauge-threshold").style.left = (100 * t).toFixed(1) + "%";
  $("gauge-threshold-label").textContent = "threshold " + pct(t);
  $("gauge").setAttribute("aria-label",
    "malignancy probability " + pct(p) + " against the operating threshold " + pct(t));
  $("p-mal").textContent = "Malignancy probability: " + pct(p) + ".";
  const where = res.site ? " of site " + res.site : "";
  const decision = $("decision");
  if (res.refer === null) {
    // a site not suitable for this model: probabilities, no decision, and why
    $("thr").textContent = "Threshold" + where + ": " + pct(t) + ".";
    decision.className = "decision undecided";
    $("decision-text").textContent = "No decision: " + res.message.replace(/^no decision at site [^:]*:\s*/, "") + ".";
  } else {
    $("thr").textContent = "Operating threshold" + where + ": " + pct(t) + (res.refer ? " (at or above it)." : " (below it).");
    decision.className = "decision " + (res.refer ? "refer" : "no-refer");
    $("decision-text").textContent = res.refer
      ? "Decision: refer. " + res.decision.replace(/^refer:\s*/, "").replace(/^./, (c) => c.toUpperCase()) + "."
      : "Decision: " + res.decision + ".";
  }

  renderBars(res.dx_probabilities);
  $("model-tag").textContent = res.model_tag;
  $("data-version").textContent = res.data_version;
  if (res.disclaimer) $("disclaimer").textContent = res.disclaimer;
}

async function loadOverlay(request) {
  const img = $("overlay"), status = $("overlay-status");
  try {
    const r = await request;
    if (!r.ok) throw new Error(await errorText(r));
    const blob = await r.blob();
    if (overlayUrl) URL.revokeObjectURL(overlayUrl);
    overlayUrl = URL.createObjectURL(blob);
    img.src = overlayUrl;
    img.hidden = false;
    status.hidden = true;
    const cls = r.headers.get("X-Gradcam-Class");
    if (cls) {
      $("overlay-caption").textContent =
        "Grad-CAM for \u201c" + (DX_NAMES[cls] || riskName(cls)) + "\u201d: where the model looked (red = most influential)";
    }
  } catch (e) {
    status.textContent = "Overlay unavailable: " + e.message;
  }
}

async function analyse(ev) {
  ev.preventDefault();
  if (!chosen) {
    showError("Choose an image first.");
    return;
  }
  clearError();
  setBusy(true);
  $("result").hidden = true;
  $("overlay").hidden = true;
  $("overlay").removeAttribute("src");
  $("overlay-status").hidden = false;
  $("overlay-status").textContent = "computing…";
  try {
    const url = similarK ? "/classify?similar=" + similarK : "/classify";
    const r = await api(url, { method: "POST", body: formData });
    if (!r.ok) {
      showError(await errorText(r));
      return;
    }
    const res = await r.json();
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(chosen);
    $("preview").src = previewUrl;
    renderResult(res);
    $("result").hidden = false;
    if (isWithheld(res)) {
      $("overlay-status").textContent = "no overlay: the image was not judged";
    } else {
      $("status").textContent = "Computing the Grad-CAM overlay…";
      await loadOverlay(api("/gradcam", { method: "POST", body: formData }));
    }
    $("result-title").focus({ preventScroll: true });
  } catch (e) {
    showError("The service could not be reached (" + e.message + ").");
  } finally {
    setBusy(false);
  }
}

function setupDropZone() {
  const drop = $("drop"), input = $("image");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => choose(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("result-title").tabIndex = -1;
  setupDropZone();
  $("form").addEventListener("submit", analyse);
  $("disagree").addEventListener("submit", disagree);
  loadModelInfo();
});
