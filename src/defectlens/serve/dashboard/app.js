// defectlens dashboard: plain JavaScript over the service's own /v1 API (no build step).
// Untrusted text (file names, operator names) is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], newestId: 0, oldestId: null, selected: null, view: null, viewModel: null, polling: null };
const POLL_MS = 2000;

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { showLogin(); throw new Error("unauthorized"); }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(body?.error?.message || `HTTP ${response.status}`);
  return body;
}

function showLogin() { $("login").hidden = false; $("main").hidden = true; }

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/v1/login", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: $("login-token").value }) });
  if (!response.ok) { $("login-error").textContent = "That token was not accepted."; return; }
  $("login").hidden = true;
  start();
});

function el(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (value, digits = 4) => (value === null || value === undefined ? "–" : Number(value).toPrecision(digits));
const pct = (value) => (value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)} %`);
const badge = (value, empty = "none") => el("span", { class: `badge ${value || "none"}` }, value || empty);

// -- feed -------------------------------------------------------------------------------------------
function filterQuery() {
  const params = new URLSearchParams();
  for (const [key, id] of [["model", "filter-model"], ["label", "filter-label"], ["verdict", "filter-verdict"]]) {
    if ($(id).value) params.set(key, $(id).value);
  }
  if ($("filter-since").value) params.set("since", `${$("filter-since").value}T00:00:00Z`);
  if ($("filter-until").value) {
    const until = new Date(`${$("filter-until").value}T00:00:00Z`);
    until.setUTCDate(until.getUTCDate() + 1);  // 'to' includes the whole day
    params.set("until", until.toISOString());
  }
  return params;
}

function feedRow(item) {
  const row = el("tr", { "data-id": item.id });
  const thumb = el("td"); thumb.append(el("img", { src: item.overlay_url || item.image_url, alt: "", loading: "lazy" }));
  const label = el("td"); label.append(badge(item.label, "no threshold"));
  const verdict = el("td"); verdict.append(badge(item.verdict, "–"));
  row.append(thumb, el("td", {}, item.id), el("td", {}, item.created_at.replace("T", " ").slice(0, 19)),
    el("td", {}, item.model), el("td", { class: "name", title: item.source_name || "" }, item.source_name || ""),
    el("td", {}, fmt(item.score)), label, verdict);
  row.addEventListener("click", () => select(item.id));
  if (state.selected?.id === item.id) row.classList.add("selected");
  return row;
}

async function loadFeed() {
  const params = filterQuery(); params.set("limit", "50");
  const page = await api(`/v1/inspections?${params}`);
  const body = $("feed").tBodies[0]; body.replaceChildren(...page.items.map(feedRow));
  state.newestId = page.items.length ? page.items[0].id : 0;
  state.oldestId = page.next_before_id;
  $("feed-more").hidden = !page.next_before_id;
}

async function loadOlder() {
  const params = filterQuery(); params.set("limit", "50"); params.set("before_id", state.oldestId);
  const page = await api(`/v1/inspections?${params}`);
  $("feed").tBodies[0].append(...page.items.map(feedRow));
  state.oldestId = page.next_before_id;
  $("feed-more").hidden = !page.next_before_id;
}

async function pollFeed() {
  try {
    const params = filterQuery(); params.set("after_id", state.newestId); params.set("limit", "100");
    const page = await api(`/v1/inspections?${params}`);
    if (page.items.length) {
      $("feed").tBodies[0].prepend(...page.items.map(feedRow));
      state.newestId = page.items[0].id;
      if (state.viewModel && page.items.some((i) => i.model === state.viewModel)) loadThresholdView();
    }
    const health = await api("/healthz");
    $("service-status").textContent = `${health.models.length} model(s) · queue ${health.queue}/${health.capacity}`;
  } catch (error) { $("service-status").textContent = `service unreachable: ${error.message}`; }
}

// -- detail and operator verdicts ---------------------------------------------------------------------
async function select(id) {
  const item = await api(`/v1/inspections/${id}`);
  state.selected = item;
  for (const row of $("feed").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.id) === id);
  $("detail-empty").hidden = true; $("detail").hidden = false;
  $("detail-id").textContent = `#${item.id}`;
  $("detail-image").src = item.image_url;
  $("detail-overlay").hidden = !item.overlay_url;
  if (item.overlay_url) $("detail-overlay").src = item.overlay_url;
  $("detail-model").textContent = item.model;
  $("detail-score").textContent = fmt(item.score, 6);
  $("detail-threshold").textContent = fmt(item.threshold, 6);
  $("detail-label").replaceChildren(badge(item.label, "no threshold"));
  $("detail-verdict").replaceChildren(badge(item.verdict, "not reviewed"));
  if (item.verdict_by) $("detail-verdict").append(` by ${item.verdict_by}`);
  const other = item.label === "anomalous" ? "normal" : "anomalous";
  $("confirm-button").disabled = !item.label;
  $("confirm-button").textContent = item.label ? `Confirm ${item.label}` : "Confirm";
  $("override-button").textContent = `Override → ${other}`;
  $("override-button").dataset.verdict = other;
}

async function setVerdict(verdict) {
  const item = await api(`/v1/inspections/${state.selected.id}/verdict`, { method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ verdict, operator: $("operator").value || null }) });
  const row = $("feed").querySelector(`tr[data-id="${item.id}"]`);
  if (row) row.replaceWith(feedRow(item));
  await select(item.id);
  if (item.model === state.viewModel) loadThresholdView();
}
$("confirm-button").addEventListener("click", () => setVerdict(state.selected.label));
$("override-button").addEventListener("click", () => setVerdict($("override-button").dataset.verdict));

// -- upload ---------------------------------------------------------------------------------------------
$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  for (const file of $("upload-file").files) form.append("image", file, file.name);
  $("upload-status").textContent = "inspecting…"; $("upload-button").disabled = true;
  try {
    const result = await api(`/v1/models/${encodeURIComponent($("upload-model").value)}/inspect`, { method: "POST", body: form });
    const done = result.items.filter((i) => i.id);
    const failed = result.items.filter((i) => i.error).map((i) => `${i.source_name}: ${i.error}`);
    $("upload-status").textContent = [`${done.length} inspected`, ...failed].join(" · ");
    await pollFeed();
    if (done.length) await select(done[0].id);
  } catch (error) { $("upload-status").textContent = error.message; }
  finally { $("upload-button").disabled = false; }
});

// -- threshold view -------------------------------------------------------------------------------------
async function loadThresholdView() {
  const model = $("threshold-model").value; if (!model) return;
  const first = state.viewModel !== model;
  state.viewModel = model;
  const threshold = first ? null : Number($("threshold-slider").value);
  const query = threshold === null ? "" : `?threshold=${threshold}`;
  const view = await api(`/v1/models/${encodeURIComponent(model)}/threshold-view${query}`);
  state.view = view;
  const edges = view.histogram.edges;
  if (edges.length) {
    const slider = $("threshold-slider");
    slider.min = edges[0]; slider.max = edges[edges.length - 1]; slider.step = (edges[edges.length - 1] - edges[0]) / 1000;
    if (first) slider.value = view.model_threshold ?? (edges[0] + edges[edges.length - 1]) / 2;
  }
  $("export-link").href = `/v1/models/${encodeURIComponent(model)}/confirmed-good.zip`;
  showDrift(view.drift);
  if (first && view.model_threshold === null) await updateRates(); else showRates(view.at);
  draw();
}

let pending = null;
async function updateRates() {
  const model = state.viewModel, threshold = Number($("threshold-slider").value);
  $("threshold-value").textContent = fmt(threshold, 5);
  draw();
  const view = await api(`/v1/models/${encodeURIComponent(model)}/threshold-view?threshold=${threshold}`);
  if (Number($("threshold-slider").value) === threshold) showRates(view.at);
}
$("threshold-slider").addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(updateRates, 80); draw(); });

function showRates(at) {
  if (!at) return;
  $("threshold-value").textContent = fmt(at.threshold, 5);
  $("false-alarm-rate").textContent = pct(at.false_alarm_rate);
  $("detection-rate").textContent = at.confirmed_defects ? `${pct(at.detection_rate)} of ${at.confirmed_defects}` : "no confirmed defects yet";
  $("recent-flagged").textContent = `${at.recent_flagged} of ${at.recent}`;
  $("good-flagged").textContent = `${at.confirmed_good_flagged} of ${at.confirmed_good}`;
  $("defects-missed").textContent = `${at.confirmed_defects_missed} of ${at.confirmed_defects}`;
}

function showDrift(drift) {
  $("drift").textContent = drift.reason;
  $("drift").className = drift.status === "drift" ? "drift" : "";
}

function draw() {
  const canvas = $("histogram"), view = state.view;
  // Draw at the canvas's on-screen size and the screen's pixel density, so text stays sharp.
  const ratio = window.devicePixelRatio || 1, width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d"); ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  if (!view || !view.histogram.edges.length) return;
  const { edges, normal, recent } = view.histogram;
  const low = edges[0], high = edges[edges.length - 1], pad = 18;
  const x = (value) => ((value - low) / (high - low)) * width;
  // Each set is scaled to its own peak: their shapes are compared, not their counts.
  const bars = (counts, colour) => {
    const peak = Math.max(1, ...counts); ctx.fillStyle = colour;
    counts.forEach((count, i) => {
      const h = (count / peak) * (height - pad);
      ctx.fillRect(x(edges[i]) + 1, height - pad - h, x(edges[i + 1]) - x(edges[i]) - 2, h);
    });
  };
  bars(normal, "rgba(29, 95, 214, .55)"); bars(recent, "rgba(232, 120, 20, .55)");
  ctx.fillStyle = "#667085"; ctx.font = "11px system-ui";
  ctx.textAlign = "left"; ctx.fillText(fmt(low, 3), 2, height - 4);
  ctx.textAlign = "right"; ctx.fillText(fmt(high, 3), width - 2, height - 4);
  const line = (value, colour, dash) => {
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.setLineDash(dash); ctx.beginPath();
    ctx.moveTo(x(value), 0); ctx.lineTo(x(value), height - pad); ctx.stroke(); ctx.setLineDash([]);
  };
  if (view.model_threshold !== null) line(view.model_threshold, "#444", [5, 4]);
  line(Number($("threshold-slider").value), "#c0262d", []);
}
window.addEventListener("resize", draw);

// -- start ----------------------------------------------------------------------------------------------
for (const id of ["filter-model", "filter-label", "filter-verdict", "filter-since", "filter-until"]) {
  $(id).addEventListener("change", loadFeed);
}
$("feed-more").addEventListener("click", loadOlder);
$("threshold-model").addEventListener("change", () => { state.viewModel = null; loadThresholdView(); });

async function start() {
  const { models } = await api("/v1/models");
  state.models = models;
  $("main").hidden = false;
  for (const id of ["upload-model", "threshold-model"]) $(id).replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name)));
  $("filter-model").replaceChildren(el("option", { value: "" }, "all"), ...models.map((m) => el("option", { value: m.name }, m.name)));
  await loadFeed();
  await loadThresholdView();
  state.polling ??= setInterval(pollFeed, POLL_MS);  // once, even when a new sign-in starts again
  pollFeed();
}

start().catch(() => {});
