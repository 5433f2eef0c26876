// fgs web page: plain JS, no build step. The API key lives in sessionStorage and only ever travels as the
// Authorization header: images are fetched with it and shown through blob: URLs, never through a URL with the key.
"use strict";

const KEY_NAME = "fgs.apiKey";
const PAGE_SIZE = 60;
const MAX_STREAMS = 3; // live SSE streams; Chromium allows 6 connections per host and thumbnails need the rest
const POLL_MS = 2000;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// ---------- API ----------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_NAME); }

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` },
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not our JSON */ }
    if (response.status === 401 && apiKey()) signOut("Your key was refused: sign in again.");
    throw new ApiError(response.status, message);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

// Thumbnails and full images: fetched with the header, cached as blob URLs (bounded), at most 6 at a time.
const blobUrls = new Map();
const BLOB_CACHE = 1500;
let inFlight = 0;
const waiting = [];

async function imageUrl(path) {
  if (blobUrls.has(path)) {
    const url = blobUrls.get(path);
    blobUrls.delete(path);
    blobUrls.set(path, url); // most recently used last
    return url;
  }
  if (inFlight >= 6) await new Promise((resolve) => waiting.push(resolve));
  inFlight += 1;
  try {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    blobUrls.set(path, url);
    while (blobUrls.size > BLOB_CACHE) {
      const [oldest, oldUrl] = blobUrls.entries().next().value;
      blobUrls.delete(oldest);
      URL.revokeObjectURL(oldUrl);
    }
    return url;
  } finally {
    inFlight -= 1;
    if (waiting.length) waiting.shift()();
  }
}

const thumbnailPath = (id) => `/v1/images/${encodeURIComponent(id)}/thumbnail?size=160`;
const fullPath = (id) => `/v1/images/${encodeURIComponent(id)}`;

function imageTile(id, className, title) {
  const img = el("img", { class: className, alt: title || id, title: title || undefined, "data-image-id": id });
  imageUrl(thumbnailPath(id))
    .then((url) => { img.src = url; })
    .catch((error) => { img.alt = `not loaded: ${error.message}`; img.classList.add("broken"); });
  return img;
}

// ---------- formatting ----------
const shortId = (id) => id.slice(0, 8);
const fmt = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toPrecision(digits));
const seconds = (date) => (date ? new Date(date).getTime() / 1000 : null);

function ago(date) {
  if (!date) return "–";
  const s = Math.max(0, Date.now() / 1000 - seconds(date));
  return s < 90 ? `${s.toFixed(1)} s ago` : `${Math.round(s / 60)} min ago`;
}

function duration(s) {
  if (s === null || !isFinite(s)) return "–";
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// images/s and ETA from the record's timestamps: a running job's rate is its images so far over its run time.
function rates(job) {
  const start = seconds(job.started_at);
  if (!start) return { perSecond: null, eta: null };
  const end = seconds(job.finished_at) || Date.now() / 1000;
  const { images_done: done, images_total: total } = job.progress;
  const perSecond = done > 0 ? done / Math.max(end - start, 1e-3) : null;
  const left = total - done;
  const eta = TERMINAL.has(job.state) ? null : perSecond ? left / perSecond : null;
  return { perSecond, eta };
}

const TERMINAL = new Set(["finished", "failed", "canceled"]);

// ---------- sign-in ----------
async function signIn(key) {
  sessionStorage.setItem(KEY_NAME, key);
  try {
    await apiJson("/v1/views/jobs?limit=1");
  } catch (error) {
    sessionStorage.removeItem(KEY_NAME);
    throw error;
  }
  await showSignedIn();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_NAME);
  for (const url of blobUrls.values()) URL.revokeObjectURL(url);
  blobUrls.clear();
  stopStreams();
  state.jobs.clear();
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("nav-operator").hidden = true;
  $("jobs-body").replaceChildren();
  $("signin-error").textContent = message || "";
  show("signin");
}

async function showSignedIn() {
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  // The operator view is offered to admin keys: the API answers 403 to the others.
  try {
    await apiJson("/v1/admin/overview");
    $("nav-operator").hidden = false;
    state.admin = true;
  } catch (_) {
    $("nav-operator").hidden = true;
    state.admin = false;
  }
  route();
}

// ---------- state ----------
const state = {
  jobs: new Map(), // job id -> a JobBase from the poll, or a JobPublic from the job's SSE stream
  streams: new Map(), // job id -> AbortController
  streamFailed: new Map(), // job id -> time its stream last broke off (not retried for a while)
  admin: false,
  gallery: { scope: {}, offset: 0, total: 0 },
  timer: null,
  classNames: new Map(), // classifier id -> its spec's class_names (null: it names none)
};

// The team's name of a job's class: its classifier spec's class_names, else the job's prompt (what the run calls
// it); the model's class index stays in the title.
function className(request) {
  const names = request.classifier_id ? state.classNames.get(request.classifier_id) : null;
  return (names && names[request.class_index]) || request.prompt;
}

async function loadClassNames(jobs) {
  const unknown = jobs.some((j) => j.request.classifier_id && !state.classNames.has(j.request.classifier_id));
  if (!unknown) return;
  try {
    for (const c of await apiJson("/v1/classifiers")) state.classNames.set(c.classifier_id, c.spec.class_names);
  } catch (error) {
    console.warn("classifier names not loaded", error);
  }
  for (const j of jobs) if (j.request.classifier_id && !state.classNames.has(j.request.classifier_id)) state.classNames.set(j.request.classifier_id, null);
}

// ---------- views ----------
function show(view) {
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === view);
}

function parseHash() {
  const [name, query] = location.hash.replace(/^#/, "").split("?");
  return { name: name || "jobs", params: new URLSearchParams(query || "") };
}

function route() {
  if (!apiKey()) { show("signin"); return; }
  clearInterval(state.timer);
  const { name, params } = parseHash();
  if (name === "gallery") { show("gallery"); openGallery(params); }
  else if (name === "compare") { show("compare"); openCompare(params); }
  else if (name === "operator" && state.admin) { show("operator"); refreshOperator(); state.timer = setInterval(refreshOperator, POLL_MS); }
  else { show("jobs"); refreshJobs(); state.timer = setInterval(refreshJobs, POLL_MS); }
}

// ---------- jobs ----------
async function refreshJobs() {
  let page;
  try {
    page = await apiJson("/v1/views/jobs?limit=200");
  } catch (error) {
    $("jobs-count").textContent = `could not load jobs: ${error.message}`;
    return;
  }
  for (const job of page.jobs) {
    const known = state.jobs.get(job.job_id);
    // an SSE event may be newer than this poll: keep the further progress
    const further = !known || job.progress.images_done >= known.progress.images_done;
    if (TERMINAL.has(job.state) || further) state.jobs.set(job.job_id, job);
  }
  const ids = new Set(page.jobs.map((j) => j.job_id));
  for (const id of [...state.jobs.keys()]) if (!ids.has(id)) state.jobs.delete(id);
  $("jobs-count").textContent = `${page.total} jobs`;
  await loadClassNames(page.jobs);
  startStreams();
  renderJobs();
}

// Live progress: the job's SSE stream, read with fetch (EventSource cannot send the Authorization header).
function startStreams() {
  const active = [...state.jobs.values()].filter((j) => !TERMINAL.has(j.state));
  active.sort((a, b) => (a.state === "running" ? -1 : 1) - (b.state === "running" ? -1 : 1));
  for (const job of active.slice(0, MAX_STREAMS)) {
    if (state.streams.size >= MAX_STREAMS) break;
    const failed = state.streamFailed.get(job.job_id);
    if (!state.streams.has(job.job_id) && !(failed && Date.now() - failed < 10 * POLL_MS)) followJob(job.job_id);
  }
}

function stopStreams() {
  for (const controller of state.streams.values()) controller.abort();
  state.streams.clear();
}

async function followJob(jobId) {
  const controller = new AbortController();
  state.streams.set(jobId, controller);
  try {
    const response = await api(`/v1/jobs/${jobId}/events`, { signal: controller.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const lines = message.split("\n");
        const event = (lines.find((l) => l.startsWith("event: ")) || "event: job").slice(7);
        const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data && (event === "job" || event === "progress")) onJobEvent(JSON.parse(data));
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      state.streamFailed.set(jobId, Date.now()); // the poll keeps the row current meanwhile
      console.warn("event stream of", jobId, error);
    }
  } finally {
    if (state.streams.get(jobId) === controller) state.streams.delete(jobId);
    if (apiKey() && parseHash().name === "jobs") startStreams();
  }
}

function onJobEvent(job) {
  // a `progress` event (state and progress) updates the row it belongs to; the final `job` event is the whole
  // JobPublic: a JobBase, which the table draws, with its results
  state.jobs.set(job.job_id, { ...state.jobs.get(job.job_id), ...job });
  if (parseHash().name === "jobs") renderJobs();
}

function progressCell(done, total, detail) {
  const percent = total ? Math.floor((100 * done) / total) : 0;
  return el("td", { class: "progress-col" },
    el("div", { class: "bar", role: "progressbar", "aria-valuenow": percent, "aria-valuemin": 0, "aria-valuemax": 100 },
      el("div", { class: "fill", style: `width:${percent}%` })),
    el("span", { class: "percent" }, `${percent} %`), " ",
    el("span", { class: "muted" }, `${done}/${total}${detail ? ` · ${detail}` : ""}`));
}

function stateBadge(value) { return el("span", { class: `state state-${value}` }, value); }

function jobRow(job, nested) {
  const { perSecond, eta } = rates(job);
  const { request, progress } = job;
  const step = job.state === "running" && progress.steps_total ? `step ${progress.step}/${progress.steps_total}` : "";
  const actions = el("td", { class: "actions" },
    el("a", { href: `#gallery?job=${job.job_id}` }, "gallery"));
  if (!TERMINAL.has(job.state)) {
    actions.append(" ", el("button", { type: "button", class: "cancel", onclick: () => cancelJob(job.job_id) }, "Cancel"));
  }
  const row = el("tr", { class: nested ? "job nested" : "job", "data-job-id": job.job_id, "data-state": job.state },
    el("td", { class: "mono", title: job.job_id }, shortId(job.job_id)),
    el("td", { title: `class ${request.class_index} of the model; prompt: ${request.prompt}` }, classCell(request)),
    el("td", {}, request.criterion === "none" ? "no feedback" : `${request.criterion} ω=${request.omega}`),
    el("td", {}, stateBadge(job.state)),
    progressCell(progress.images_done, progress.images_total, step),
    el("td", {}, perSecond ? perSecond.toFixed(2) : "–"),
    el("td", {}, duration(eta)),
    actions);
  if (job.error && job.error.message) {
    row.children[3].append(el("div", { class: "error small" }, `${job.error.code}: ${job.error.message}`));
  }
  return row;
}

function classCell(request) {
  const name = className(request);
  return name === request.prompt ? name : [name, el("span", { class: "muted" }, ` · ${request.prompt}`)];
}

function batchRow(batchId, jobs) {
  const done = jobs.reduce((n, j) => n + j.progress.images_done, 0);
  const total = jobs.reduce((n, j) => n + j.progress.images_total, 0);
  const counts = {};
  for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
  const starts = jobs.map((j) => seconds(j.started_at)).filter(Boolean);
  const running = jobs.some((j) => !TERMINAL.has(j.state));
  const end = running ? Date.now() / 1000 : Math.max(...jobs.map((j) => seconds(j.finished_at) || 0));
  const perSecond = starts.length && done ? done / Math.max(end - Math.min(...starts), 1e-3) : null;
  const eta = running && perSecond ? (total - done) / perSecond : null;
  const summary = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ");
  const actions = el("td", { class: "actions" },
    el("a", { href: `#gallery?batch=${batchId}` }, "gallery"), " ",
    el("a", { href: `#compare?batch=${batchId}` }, "compare"));
  if (running) actions.append(" ", el("button", { type: "button", class: "cancel", onclick: () => cancelBatch(batchId) }, "Cancel batch"));
  return el("tr", { class: "batch", "data-batch-id": batchId },
    el("td", { class: "mono", title: batchId }, `batch ${shortId(batchId)}`),
    el("td", {}, `${new Set(jobs.map((j) => j.request.class_index)).size} classes`),
    el("td", {}, `${jobs.length} jobs`),
    el("td", {}, summary),
    progressCell(done, total, ""),
    el("td", {}, perSecond ? perSecond.toFixed(2) : "–"),
    el("td", {}, duration(eta)),
    actions);
}

// The state filter: which jobs the table shows (a batch shows the jobs of its that pass).
const STATE_FILTERS = { all: null, active: ["queued", "running"], queued: ["queued"], running: ["running"],
  finished: ["finished"], failed: ["failed"], canceled: ["canceled"], ended: ["finished", "failed", "canceled"] };

function renderJobs() {
  const wanted = STATE_FILTERS[$("jobs-state").value];
  const jobs = [...state.jobs.values()].filter((j) => !wanted || wanted.includes(j.state))
    .sort((a, b) => seconds(b.created_at) - seconds(a.created_at));
  const rows = [];
  const batches = new Map();
  for (const job of jobs) {
    if (!job.batch_id) {
      rows.push({ at: seconds(job.created_at), running: job.state === "running", nodes: [jobRow(job, false)] });
      continue;
    }
    if (!batches.has(job.batch_id)) batches.set(job.batch_id, []);
    batches.get(job.batch_id).push(job);
  }
  for (const [batchId, members] of batches) {
    members.sort((a, b) => seconds(a.created_at) - seconds(b.created_at));
    members.sort((a, b) => (b.state === "running") - (a.state === "running"));
    rows.push({ at: seconds(members[0].created_at), running: members.some((j) => j.state === "running"),
      nodes: [batchRow(batchId, members), ...members.map((j) => jobRow(j, true))] });
  }
  rows.sort((a, b) => (b.running - a.running) || (b.at - a.at)); // running first, then newest
  $("jobs-body").replaceChildren(...rows.flatMap((r) => r.nodes));
  $("jobs-empty").hidden = jobs.length > 0;
}

async function cancelJob(jobId) {
  try {
    onJobEvent(await apiJson(`/v1/jobs/${jobId}`, { method: "DELETE" }));
  } catch (error) {
    alert(`Cancel failed: ${error.message}`);
  }
  refreshJobs();
}

async function cancelBatch(batchId) {
  try {
    await apiJson(`/v1/batches/${batchId}`, { method: "DELETE" });
  } catch (error) {
    alert(`Cancel failed: ${error.message}`);
  }
  refreshJobs();
}

// ---------- gallery ----------
function galleryQuery() {
  const scope = state.gallery.scope;
  const query = new URLSearchParams();
  if (scope.job) query.set("job_id", scope.job);
  if (scope.batch) query.set("batch_id", scope.batch);
  const cls = $("gallery-class").value;
  if (cls !== "") query.set("class_index", cls);
  if ($("gallery-group").value !== "") query.set("group", $("gallery-group").value);
  query.set("sort", $("gallery-sort").value);
  if ($("gallery-disagrees").checked) query.set("disagrees", "true");
  if ($("gallery-min").value !== "") query.set("min_criterion", $("gallery-min").value);
  if ($("gallery-max").value !== "") query.set("max_criterion", $("gallery-max").value);
  query.set("offset", state.gallery.offset);
  query.set("limit", PAGE_SIZE);
  return query;
}

function openGallery(params) {
  const scope = { job: params.get("job"), batch: params.get("batch") };
  const changed = scope.job !== state.gallery.scope.job || scope.batch !== state.gallery.scope.batch;
  state.gallery.scope = scope;
  if (changed) state.gallery.offset = 0;
  if (params.has("class")) $("gallery-class").value = params.get("class");
  else if (changed) $("gallery-class").value = "";
  if (changed) $("gallery-group").value = "";
  $("gallery-title").textContent = scope.job ? `Gallery · job ${shortId(scope.job)}`
    : scope.batch ? `Gallery · batch ${shortId(scope.batch)}` : "Gallery · recent jobs";
  $("gallery-detail").hidden = true;
  loadGallery();
}

let galleryRequest = 0;

async function loadGallery() {
  const ticket = ++galleryRequest;
  $("gallery-error").textContent = "";
  const grid = $("gallery-grid");
  grid.setAttribute("aria-busy", "true");
  let page;
  try {
    page = await apiJson(`/v1/views/gallery?${galleryQuery()}`);
  } catch (error) {
    if (ticket !== galleryRequest) return;
    grid.replaceChildren();
    grid.removeAttribute("aria-busy");
    $("gallery-error").textContent = error.message;
    $("gallery-page-label").textContent = "";
    return;
  }
  if (ticket !== galleryRequest) return; // a newer request is on its way
  state.gallery.total = page.total;
  const select = $("gallery-class");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"),
    ...page.classes.map((c) => el("option", { value: c.class_index, title: `class ${c.class_index}: ${c.prompt}` }, `${c.class_name} (${c.images})`)));
  select.value = chosen;
  const groupSelect = $("gallery-group"); // class × group runs (NICO++): shown when the scope has groups
  const chosenGroup = groupSelect.value;
  groupSelect.replaceChildren(el("option", { value: "" }, "all"), ...page.groups.map((g) => el("option", { value: g }, g)));
  groupSelect.value = page.groups.includes(chosenGroup) ? chosenGroup : "";
  $("gallery-group-label").hidden = page.groups.length === 0;
  const real = $("gallery-real");
  real.replaceChildren(el("span", { class: "muted" }, "real"),
    ...page.conditioning_image_ids.map((id) => imageTile(id, "thumb real", "conditioning image")));
  real.hidden = page.conditioning_image_ids.length === 0;
  const tiles = page.items.map((item) => galleryTile(item));
  grid.replaceChildren(...tiles);
  const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
  const current = Math.floor(page.offset / PAGE_SIZE) + 1;
  $("gallery-page-label").textContent = `page ${current} of ${pages} · ${page.total} images`;
  $("gallery-prev").disabled = page.offset === 0;
  $("gallery-next").disabled = page.offset + PAGE_SIZE >= page.total;
  await Promise.all(tiles.map((t) => t.loaded));
  if (ticket === galleryRequest) grid.setAttribute("aria-busy", "false");
}

function metaRows(item) {
  return [
    ["image", item.image_id], ["job", item.job_id], ["class", `${item.class_name} (class ${item.class_index})`],
    ["prompt", item.prompt], ...(item.group ? [["group", item.group]] : []), ["seed", item.seed], ["criterion", item.generation.criterion], ["ω", item.generation.omega],
    ["γ", item.generation.gamma], ["p", item.generation.dropout_p],
    ["predicted class", predicted(item)], ["criterion value", fmt(item.criterion_value, 4)],
  ];
}

// ŷ as the team names it (class_name's source), its index where no name is known
function predicted(item) {
  if (item.predicted_class === null || item.predicted_class === undefined) return "–";
  return item.predicted_name ?? `class ${item.predicted_class}`;
}

function galleryTile(item) {
  const title = metaRows(item).map(([k, v]) => `${k}: ${v}`).join("\n");
  const img = el("img", { class: "thumb", alt: `seed ${item.seed}`, title, "data-image-id": item.image_id });
  const figure = el("figure", {
    class: item.disagrees ? "tile disagrees" : "tile", "data-image-id": item.image_id, tabindex: 0,
    onclick: () => showDetail(item), onkeydown: (e) => { if (e.key === "Enter") showDetail(item); },
  }, img, el("figcaption", {}, `seed ${item.seed}`, el("br"), `C=${fmt(item.criterion_value)} · ŷ=${predicted(item)}${item.disagrees ? ` ≠ ${item.class_name}` : ""}`));
  figure.loaded = imageUrl(thumbnailPath(item.image_id))
    .then((url) => { img.src = url; return img.decode().catch(() => {}); })
    .catch((error) => { img.alt = `not loaded: ${error.message}`; img.classList.add("broken"); });
  return figure;
}

async function showDetail(item) {
  const panel = $("gallery-detail");
  panel.hidden = false;
  panel.dataset.imageId = item.image_id;
  $("detail-meta").replaceChildren(...metaRows(item).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { class: k === "image" || k === "job" ? "mono" : "" }, v))));
  const img = $("detail-image");
  img.removeAttribute("src");
  img.dataset.imageId = item.image_id;
  try {
    img.src = await imageUrl(fullPath(item.image_id));
  } catch (error) {
    img.alt = `not loaded: ${error.message}`;
  }
}

// ---------- compare ----------
async function openCompare(params) {
  const batches = [...new Set([...state.jobs.values()].map((j) => j.batch_id).filter(Boolean))];
  if (!state.jobs.size) {
    try {
      const page = await apiJson("/v1/views/jobs?limit=500");
      for (const job of page.jobs) state.jobs.set(job.job_id, job);
      batches.push(...new Set(page.jobs.map((j) => j.batch_id).filter(Boolean)));
    } catch (error) {
      $("compare-error").textContent = error.message;
      return;
    }
  }
  const batchSelect = $("compare-batch");
  const wanted = params.get("batch") || batchSelect.value || batches[0] || "";
  batchSelect.replaceChildren(el("option", { value: "" }, "recent jobs"),
    ...batches.map((b) => el("option", { value: b }, shortId(b))));
  batchSelect.value = wanted;
  const inScope = [...state.jobs.values()].filter((j) => !wanted || j.batch_id === wanted)
    .sort((a, b) => seconds(b.created_at) - seconds(a.created_at));
  await loadClassNames(inScope);
  const names = new Map(); // class index -> its name in the newest job of the scope
  for (const j of inScope) if (!names.has(j.request.class_index)) names.set(j.request.class_index, className(j.request));
  const classes = [...names.keys()].sort((a, b) => a - b);
  const classSelect = $("compare-class");
  const chosen = params.get("class") || classSelect.value;
  classSelect.replaceChildren(...classes.map((c) => el("option", { value: c, title: `class ${c}` }, names.get(c))));
  if (classes.map(String).includes(chosen)) classSelect.value = chosen;
  loadCompare();
}

async function loadCompare() {
  $("compare-error").textContent = "";
  const table = $("compare-grid");
  if ($("compare-class").value === "") { table.replaceChildren(); $("compare-error").textContent = "no class to compare"; return; }
  const query = new URLSearchParams({ class_index: $("compare-class").value, rows: $("compare-rows").value, seeds: 8 });
  if ($("compare-batch").value) query.set("batch_id", $("compare-batch").value);
  let grid;
  try {
    grid = await apiJson(`/v1/views/compare?${query}`);
  } catch (error) {
    $("compare-error").textContent = error.message;
    return;
  }
  table.replaceChildren(
    el("thead", {}, el("tr", {}, el("th", { title: `class ${grid.class_index}` }, grid.class_name), ...grid.seeds.map((s) => el("th", {}, `seed ${s}`)))),
    el("tbody", {}, ...grid.rows.map((row) => el("tr", {}, el("th", {}, row.label),
      ...row.cells.map((cell) => el("td", {}, cell ? imageTile(cell.image_id, "thumb", metaRows(cell).map(([k, v]) => `${k}: ${v}`).join("\n")) : "–"))))));
}

// ---------- operator ----------
async function refreshOperator() {
  let view;
  try {
    view = await apiJson("/v1/admin/overview");
  } catch (error) {
    $("operator-error").textContent = error.message;
    return;
  }
  $("operator-error").textContent = "";
  $("op-updated").textContent = `updated ${new Date(view.generated_at).toLocaleTimeString()}`;
  $("op-tenants").replaceChildren(...view.tenants.map((t) => el("tr", { "data-tenant": t.tenant },
    el("td", {}, t.tenant), el("td", {}, t.queued_jobs), el("td", {}, t.queued_images), el("td", {}, t.running_jobs))));
  if (!view.tenants.length) $("op-tenants").append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "no tenant has queued anything")));
  $("op-workers").replaceChildren(...view.workers.map((w) => el("tr", { "data-worker": w.name },
    el("td", { class: "mono" }, w.name), el("td", {}, ago(w.last_heartbeat)),
    el("td", { class: "mono" }, w.job_id ? `${shortId(w.job_id)} (${w.job_tenant})` : "idle"))));
  if (!view.workers.length) $("op-workers").append(el("tr", {}, el("td", { colspan: 3, class: "muted" }, "no live workers")));
  const peak = Math.max(1, ...view.throughput.map((m) => m.images));
  const clock = (date) => new Date(date).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  $("op-throughput").replaceChildren(...view.throughput.map((m, i) => el("div", { class: "bar-col", title: `${clock(m.minute)}: ${m.images} images` },
    el("div", { class: "bar-value" }, m.images >= 0.5 ? Math.round(m.images) : ""),
    el("div", { class: "bar-fill", style: `height:${(100 * m.images) / peak}%` }),
    el("div", { class: "bar-label" }, i % 2 === view.throughput.length % 2 ? "" : clock(m.minute)))));
  $("op-rate").textContent = `${view.images_per_s_last_minute.toFixed(2)} images/s over the last minute`;
  $("op-failed").replaceChildren(...view.failed_jobs.map((f) => el("tr", { "data-job-id": f.job_id },
    el("td", { class: "mono", title: f.job_id }, shortId(f.job_id)), el("td", {}, f.tenant), el("td", {}, ago(f.finished_at)),
    el("td", { class: "error" }, f.error ? `${f.error.code}: ${f.error.message}` : "–"))));
  if (!view.failed_jobs.length) $("op-failed").append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "none in the last 10 minutes")));
}

// ---------- wiring ----------
$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("signin-error").textContent = "";
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  try {
    await signIn(key);
  } catch (error) {
    $("signin-error").textContent = error.status === 401 ? "Unknown API key." : error.message;
  }
});
$("sign-out").addEventListener("click", () => signOut(""));
for (const id of ["gallery-class", "gallery-group", "gallery-sort", "gallery-disagrees", "gallery-min", "gallery-max"]) {
  $(id).addEventListener("change", () => { state.gallery.offset = 0; loadGallery(); });
}
$("gallery-prev").addEventListener("click", () => { state.gallery.offset = Math.max(0, state.gallery.offset - PAGE_SIZE); loadGallery(); });
$("gallery-next").addEventListener("click", () => { state.gallery.offset += PAGE_SIZE; loadGallery(); });
$("compare-batch").addEventListener("change", () => openCompare(new URLSearchParams({ batch: $("compare-batch").value })));
$("compare-class").addEventListener("change", loadCompare);
$("compare-rows").addEventListener("change", loadCompare);
$("jobs-state").addEventListener("change", renderJobs);
window.addEventListener("hashchange", route);

if (apiKey()) showSignedIn(); else show("signin");
