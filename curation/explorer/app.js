// The curation explorer: search the lake's index through the service's API (same origin, relative paths), page
// through the results, inspect a result's provenance, export the results and save them as a subset.
// Captions and URLs come from the web: they are only ever set as text or as checked http(s) links.
"use strict";

const PAGE_SIZE = 40;
const THUMB_CONCURRENCY = 6;
const TOKEN_KEY = "curation-explorer-token";
const SECTION_ORDER = ["pairs", "download", "clip", "safety", "dedupe", "index", "subsets"];
const VERDICT_KEYS = ["uid", "kept", "dropped_at", "reason", "url", "caption"];

const state = {
  query: null,      // {kind: "text"|"image"|"image_url", value, label}
  body: null,       // the /knn-service body of the results shown
  results: [],
  page: 0,
  searches: 0,      // completed searches (tests and screen readers wait on it)
};

const $ = (selector) => document.querySelector(selector);

// ------------------------------------------------------------------------------------------------------- the API

class ApiError extends Error {
  // `answered`: the service itself gave the reason (a JSON error); false when no such route exists on it.
  constructor(status, message, answered) {
    super(message);
    this.status = status;
    this.answered = answered;
  }

  get noEndpoint() {
    return this.status === 404 && !this.answered;
  }
}

function authHeaders(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// One API call: a GET, or a POST of `body` as JSON; waits out 429s (Retry-After) a few times; throws ApiError with
// the service's JSON reason otherwise.
async function api(path, body) {
  const init = body === undefined
    ? { headers: authHeaders() }
    : { method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, init);
    if (response.ok) return response;
    if (response.status === 429 && attempt < 5) {
      await sleep(1000 * Math.max(1, Number(response.headers.get("Retry-After")) || 1));
      continue;
    }
    let reason = `${response.status} ${response.statusText}`;
    let answered = false;
    if ((response.headers.get("Content-Type") || "").includes("json")) {
      reason = (await response.json()).error || reason;
      answered = true;
    }
    throw new ApiError(response.status, reason, answered);
  }
}

// JSON whose 64-bit integers survive: uids (and ids such as cluster ids) exceed 2^53, which JavaScript numbers
// cannot hold, so every integer of 16+ digits that is an object's value is read as a string (as clip-front does
// with json-bigint). Inside a JSON string a quote is always escaped, so a key's quote is never preceded by "\".
function parseJson(text) {
  return JSON.parse(text.replace(/(?<!\\)("(?:[^"\\]|\\.)*"\s*:\s*)(-?\d{16,})(?=\s*[,}\]])/g, '$1"$2"'));
}

async function apiJson(path, body) {
  return parseJson(await (await api(path, body)).text());
}

// --------------------------------------------------------------------------------------------------- thumbnails

const thumbnails = new Map(); // uid -> Promise of an object URL (kept for the tab's life; the images are small)
let thumbsRunning = 0;
const thumbQueue = [];

function thumbnail(uid) {
  if (!thumbnails.has(uid)) {
    thumbnails.set(uid, new Promise((resolve, reject) => {
      thumbQueue.push({ uid, resolve, reject });
      pumpThumbnails();
    }));
    thumbnails.get(uid).catch(() => thumbnails.delete(uid)); // a failed load is retried next time it is shown
  }
  return thumbnails.get(uid);
}

function pumpThumbnails() {
  while (thumbsRunning < THUMB_CONCURRENCY && thumbQueue.length) {
    const job = thumbQueue.shift();
    thumbsRunning++;
    api(`image/${encodeURIComponent(job.uid)}`)
      .then((response) => response.blob())
      .then((blob) => job.resolve(URL.createObjectURL(blob)), job.reject)
      .finally(() => {
        thumbsRunning--;
        pumpThumbnails();
      });
  }
}

// ------------------------------------------------------------------------------------------------------ queries

function numberOr(value) {
  return value === "" || value === null ? undefined : Number(value);
}

function listOr(value) {
  const items = value.split(",").map((s) => s.trim()).filter(Boolean);
  return items.length ? items : undefined;
}

// The filter panel as /knn-service fields (empty inputs are left out).
function filterFields() {
  const form = $("#filters").elements;
  const safe = form.safe.checked;
  const fields = {
    use_safety_model: safe,
    use_violence_detector: safe,
    deduplicate: form.deduplicate.checked,
    language: listOr(form.language.value),
    crawl: listOr(form.crawl.value),
    subset: form.subset.value.trim() || undefined,
  };
  for (const name of ["min_aesthetic", "max_aesthetic", "min_similarity", "max_punsafe", "max_pwatermark",
    "min_original_width", "min_original_height"]) {
    fields[name] = numberOr(form[name].value);
  }
  if (form.aesthetic_score.value !== "") {
    fields.aesthetic_score = Number(form.aesthetic_score.value);
    fields.aesthetic_weight = numberOr(form.aesthetic_weight.value) ?? 0.5;
  }
  return fields;
}

function requestBody() {
  return {
    [state.query.kind]: state.query.value,
    modality: $("#modality").value,
    num_images: Number($("#num-images").value),
    ...filterFields(),
  };
}

let searchSerial = 0;

async function search(query) {
  if (query) state.query = query;
  if (!state.query) return;
  const serial = ++searchSerial;
  const body = requestBody();
  setStatus(`Searching ${state.query.label}…`);
  document.body.classList.add("busy");
  try {
    const results = await apiJson("knn-service", body);
    if (serial !== searchSerial) return; // a later search was started meanwhile
    state.body = body;
    state.results = results.filter((r) => r.url !== undefined);
    state.page = 0;
    render();
    // a text query is kept in the address (to reload or share it); an image query cannot be
    const address = state.query.kind === "text" ? `?q=${encodeURIComponent(state.query.value)}` : location.pathname;
    history.replaceState(null, "", address);
  } catch (error) {
    if (serial === searchSerial) showError(error);
  } finally {
    if (serial === searchSerial) {
      document.body.classList.remove("busy");
      state.searches++;
      document.body.dataset.searches = String(state.searches);
    }
  }
}

function textQuery(text) {
  $("#q").value = text;
  return { kind: "text", value: text, label: `“${text}”` };
}

function readAsBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function moreLikeThis(result) {
  try {
    const blob = await (await api(`image/${encodeURIComponent(result.uid)}`)).blob();
    await search({ kind: "image", value: await readAsBase64(blob), label: `images like #${result.uid}` });
  } catch (error) {
    showError(error);
  }
}

// ------------------------------------------------------------------------------------------------------ results

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401) {
    setStatus("This service needs its bearer token: enter it under API token above.", true);
    $("#token").classList.add("wanted");
    $("#token").focus();
  } else {
    setStatus(error instanceof ApiError ? `The service refused: ${error.message}` : `Failed: ${error.message}`, true);
  }
}

function pages() {
  return Math.max(1, Math.ceil(state.results.length / PAGE_SIZE));
}

function render() {
  const n = state.results.length;
  const first = state.page * PAGE_SIZE;
  const shown = state.results.slice(first, first + PAGE_SIZE);
  setStatus(n ? `${n} results for ${state.query.label} · showing ${first + 1}–${first + shown.length}`
    : `No results for ${state.query.label} with these filters.`);
  for (const id of ["#export-parquet", "#export-json", "#save-open"]) $(id).disabled = !n;
  $("#grid").replaceChildren(...shown.map((result, i) => card(result, first + i + 1)));
  renderPager($("#pager"));
  renderPager($("#pager-bottom"));
}

function renderPager(nav) {
  nav.replaceChildren();
  if (pages() < 2) return;
  const go = (page) => {
    state.page = page;
    render();
    window.scrollTo({ top: 0 });
  };
  nav.append(button("‹ Prev", () => go(state.page - 1), { disabled: state.page === 0, className: "prev" }));
  for (let p = 0; p < pages(); p++) {
    nav.append(button(String(p + 1), () => go(p), { className: p === state.page ? "page current" : "page" }));
  }
  nav.append(button("Next ›", () => go(state.page + 1), { disabled: state.page >= pages() - 1, className: "next" }));
}

function button(text, onClick, { disabled = false, className = "" } = {}) {
  const b = element("button", className, text);
  b.type = "button";
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function card(result, rank) {
  const article = element("article", "card");
  Object.assign(article.dataset, {
    uid: result.uid, url: result.url, similarity: result.similarity, aesthetic: result.aesthetic ?? "",
    punsafe: result.punsafe ?? "", pwatermark: result.pwatermark ?? "",
    captionSimilarity: result.caption_similarity ?? "", originalWidth: result.original_width ?? "",
    originalHeight: result.original_height ?? "", language: result.language ?? "",
  });
  const figure = element("figure", "thumb");
  const img = element("img");
  img.alt = result.caption || "";
  img.decoding = "async";
  thumbnail(result.uid).then((src) => { img.src = src; }, () => figure.classList.add("missing"));
  figure.append(img, element("span", "rank", `#${rank}`), element("span", "sim", fixed(result.similarity, 3)));
  const caption = element("p", "caption", result.caption || "(no caption)");
  caption.title = result.caption || "";
  const scores = element("dl", "scores");
  const size = result.original_width ? `${result.original_width}×${result.original_height}` : "–";
  for (const [name, value, title] of [
    ["aes", fixed(result.aesthetic, 2), "aesthetic score"],
    ["sim", fixed(result.caption_similarity, 2), "image–caption similarity"],
    ["unsafe", fixed(result.punsafe, 2), "probability unsafe"],
    ["wm", fixed(result.pwatermark, 2), "probability watermarked"],
    ["size", size, "original width × height"],
    ["lang", result.language || "–", "caption language"],
  ]) {
    const dt = element("dt", "", name);
    dt.title = title;
    scores.append(dt, element("dd", `score-${name}`, value));
  }
  const actions = element("div", "card-actions");
  actions.append(
    button("More like this", () => moreLikeThis(result), { className: "like" }),
    button("Search caption", () => search(textQuery(result.caption || "")), { className: "caption-search" }),
    button("Provenance", () => explain(result.uid), { className: "explain" }),
  );
  const source = element("a", "source", hostOf(result.url));
  if (/^https?:\/\//i.test(result.url || "")) {
    source.href = result.url;
    source.target = "_blank";
    source.rel = "noopener noreferrer nofollow";
  }
  article.append(figure, caption, scores, source, actions);
  return article;
}

function hostOf(url) {
  try {
    return new URL(url).host;
  } catch (_) {
    return url || "";
  }
}

// --------------------------------------------------------------------------------------------------- provenance

async function explain(uid) {
  const drawer = $("#provenance");
  const body = $("#provenance-body");
  drawer.hidden = false;
  drawer.dataset.uid = uid;
  body.replaceChildren(element("p", "hint", `Loading the record of #${uid}…`));
  try {
    const record = await apiJson(`explain/${encodeURIComponent(uid)}`);
    if (drawer.dataset.uid === String(uid)) body.replaceChildren(...provenance(record, uid));
  } catch (error) {
    const text = error instanceof ApiError && error.noEndpoint
      ? "This service does not explain results (no /explain endpoint)." : `No provenance: ${error.message}`;
    body.replaceChildren(element("p", "error", text));
  }
}

function provenance(record, uid) {
  const kept = record.kept === true;
  const gone = record.status === "taken_down"; // the service says only the list and when
  const dropped = record.kept === false || gone;
  const verdict = element("section", `verdict ${kept ? "kept" : dropped ? "dropped" : "unknown"}`);
  const head = element("div", "verdict-head");
  const said = element("div");
  said.append(element("h3", "", kept ? "Kept" : gone ? "Taken down" : dropped
    ? `Dropped${record.dropped_at ? ` at ${record.dropped_at}` : ""}` : "No verdict"));
  if (gone) said.append(element("p", "reason", `by the takedown list ${record.list}`));
  else if (!kept && record.reason) said.append(element("p", "reason", record.reason));
  const preview = element("img", "preview");
  preview.alt = "";
  thumbnail(uid).then((src) => { preview.src = src; }, () => preview.remove());
  head.append(said, preview);
  verdict.append(head);
  // the verdict's table: its own keys first, then the record's other plain values (crawl, segment, ...)
  const isSection = (k) => !VERDICT_KEYS.includes(k) && (record[k] === null || typeof record[k] === "object");
  const plain = [...VERDICT_KEYS.filter((k) => k in record), ...Object.keys(record).filter(
    (k) => !VERDICT_KEYS.includes(k) && !isSection(k))];
  verdict.append(table(Object.fromEntries(plain.map((k) => [k, record[k]]))));
  const sections = Object.keys(record).filter(isSection);
  sections.sort((a, b) => order(a) - order(b));
  return [verdict, ...sections.map((key) => section(key, record[key]))];
}

function order(key) {
  const i = SECTION_ORDER.indexOf(key);
  return i < 0 ? SECTION_ORDER.length : i;
}

function section(name, value) {
  const s = element("section", "section");
  s.dataset.section = name;
  s.append(element("h3", "", name));
  if (value === null || value === undefined) {
    s.classList.add("unreached");
    s.append(element("p", "hint", "not reached"));
  } else if (Array.isArray(value)) {
    s.append(value.length ? rows(value) : element("p", "hint", "none"));
  } else if (typeof value === "object") {
    s.append(table(value));
  } else {
    s.append(element("p", "", String(value)));
  }
  return s;
}

function cellText(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function table(object) {
  const t = element("table", "kv");
  for (const [key, value] of Object.entries(object)) {
    const tr = element("tr");
    tr.dataset.key = key;
    tr.append(element("th", "", key), element("td", "", cellText(value)));
    t.append(tr);
  }
  return t;
}

function rows(items) {
  const columns = [...new Set(items.flatMap((item) => (item && typeof item === "object" ? Object.keys(item) : [])))];
  const t = element("table", "rows");
  const head = element("tr");
  head.append(...columns.map((c) => element("th", "", c)));
  t.append(head);
  for (const item of items) {
    const tr = element("tr");
    tr.append(...columns.map((c) => element("td", "", cellText(item[c]))));
    t.append(tr);
  }
  return t;
}

// ----------------------------------------------------------------------------------------- export and subsets

async function exportResults(format) {
  try {
    const response = await api("export", { ...state.body, format });
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (/filename="?([^";]+)"?/.exec(disposition) || [])[1] || `results.${format}`;
    const url = URL.createObjectURL(await response.blob());
    const link = element("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    setStatus(`Exported ${state.results.length} results as ${name}.`);
  } catch (error) {
    showError(error);
  }
}

async function saveSubset(event) {
  event.preventDefault();
  const form = $("#save-form");
  if (!form.reportValidity()) return;
  const f = form.elements;
  const request = { name: f.name.value.trim(), query: state.body };
  if (f.description.value.trim()) request.description = f.description.value.trim();
  if (f.cut.value === "top_k") request.top_k = Number(f.top_k.value);
  else request.min_similarity = Number(f.min_similarity.value);
  const out = $("#save-result");
  out.replaceChildren(element("p", "hint", "Saving…"));
  $("#save-submit").disabled = true;
  try {
    const release = await apiJson("subsets", request);
    const done = element("div", "saved");
    const diff = release.diff || {};
    done.append(element("p", "ok", `Saved subset ${release.name}, release ${release.release}.`), table({
      name: release.name, release: release.release, rows: release.rows, new_release: release.new_release,
      added: diff.added, removed: diff.removed,
    }), element("p", "hint", `Filter any search by it: “in subset” ${release.name}.`));
    out.replaceChildren(done);
    loadSubsetNames();
  } catch (error) {
    out.replaceChildren(element("p", "error", error instanceof ApiError && error.noEndpoint
      ? "This service cannot save subsets (no /subsets endpoint)." : `Not saved: ${error.message}`));
  } finally {
    $("#save-submit").disabled = false;
  }
}

async function loadSubsetNames() {
  try {
    const listed = await apiJson("subsets");
    const items = Array.isArray(listed) ? listed : listed.subsets || Object.keys(listed);
    const names = items.map((s) => (typeof s === "string" ? s : s.name)).filter(Boolean);
    const list = element("datalist");
    list.id = "subset-names";
    list.append(...names.map((name) => Object.assign(element("option"), { value: name })));
    document.querySelector("#subset-names")?.remove();
    document.body.append(list);
    $("#filters").elements.subset.setAttribute("list", "subset-names");
  } catch (_) { /* no subset listing on this service: the field stays free text */ }
}

// ---------------------------------------------------------------------------------------------------- start-up

async function showHealth() {
  try {
    const health = await (await fetch("health")).json();
    $("#health").textContent = `index ${health.index} · generation ${health.generation} · `
      + `${Number(health.vectors).toLocaleString("en")} images`;
  } catch (_) {
    $("#health").textContent = "the service does not answer";
  }
}

let filterTimer;

function wire() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#q").value.trim();
    if (text) search(textQuery(text));
  });
  $("#url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("#image-url").value.trim();
    if (url) search({ kind: "image_url", value: url, label: `the image at ${url}` });
  });
  $("#upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) search({ kind: "image", value: await readAsBase64(file), label: `images like ${file.name}` });
  });
  const again = () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => search(), 250);
  };
  for (const id of ["#filters", "#modality", "#num-images"]) $(id).addEventListener("change", again);
  $("#filters").addEventListener("reset", () => setTimeout(again));
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("#token").classList.remove("wanted");
    thumbnails.clear();
    loadSubsetNames();
    search();
  });
  $("#provenance-close").addEventListener("click", () => { $("#provenance").hidden = true; });
  $("#export-parquet").addEventListener("click", () => exportResults("parquet"));
  $("#export-json").addEventListener("click", () => exportResults("json"));
  $("#save-open").addEventListener("click", () => {
    $("#save-result").replaceChildren();
    // a floor at the last result's similarity keeps about what is shown now
    const last = state.results[state.results.length - 1];
    if (last) $("#save-form").elements.min_similarity.value = (Math.floor(last.similarity * 100) / 100).toFixed(2);
    $("#save-dialog").showModal();
  });
  $("#save-cancel").addEventListener("click", () => $("#save-dialog").close());
  $("#save-form").addEventListener("submit", saveSubset);
}

function start() {
  wire();
  $("#token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  showHealth();
  loadSubsetNames();
  const q = new URLSearchParams(location.search).get("q");
  if (q) search(textQuery(q));
}

document.addEventListener("DOMContentLoaded", start);
