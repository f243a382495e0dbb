// The lipkit search page: text, image and "more like this" queries against the server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { index: null, query: null, offset: 0, nextOffset: null, sources: new Set() };

function api(path) {
  return `/api/indexes/${encodeURIComponent(state.index)}${path}`;
}

function options(offset) {
  const params = new URLSearchParams({ k: $("k").value, offset: String(offset) });
  const clauses = [];
  if ($("source").value) clauses.push(`source = ${$("source").value}`);
  if ($("where").value.trim()) clauses.push($("where").value.trim());
  if (clauses.length) params.set("where", clauses.join(" and "));
  if ($("collapse").checked) params.set("collapse", "0.94");
  return params;
}

async function request(query, offset) {
  const params = options(offset);
  if (query.kind === "text") {
    params.set("q", query.text);
    return fetch(api(`/search?${params}`));
  }
  if (query.kind === "similar") {
    params.set("key", query.key);
    return fetch(api(`/similar?${params}`));
  }
  const form = new FormData();
  form.append("file", query.file, query.file.name || "image");
  return fetch(api(`/search/image?${params}`), { method: "POST", body: form });
}

async function run(query, offset = 0) {
  state.query = query;
  const started = performance.now();
  setStatus(offset ? "Loading more…" : "Searching…");
  let answer;
  try {
    const response = await request(query, offset);
    answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || `error ${response.status}`);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  if (!offset) $("results").replaceChildren();
  answer.results.forEach((hit) => $("results").appendChild(card(hit)));
  state.nextOffset = answer.next_offset;
  $("more").hidden = answer.next_offset === null;
  const shown = $("results").children.length;
  const ms = Math.round(performance.now() - started);
  setStatus(shown ? `${shown} results for ${describe(query)} · ${ms} ms` : `No results for ${describe(query)}`);
  showQueryChip(query);
}

function describe(query) {
  if (query.kind === "text") return `“${query.text}”`;
  if (query.kind === "similar") return `items like “${query.caption || query.key}”`;
  return `the image ${query.file.name || ""}`.trim();
}

function card(hit) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.dataset.key = hit.key;
  const img = node.querySelector("img");
  img.src = hit.thumbnail;
  img.alt = hit.caption || hit.key;
  img.addEventListener("error", () => { img.replaceWith(Object.assign(document.createElement("span"), { textContent: "no thumbnail", className: "source" })); });
  node.querySelector(".caption").textContent = hit.caption || hit.key;
  node.querySelector(".source").textContent = hit.source || "";
  node.querySelector(".score").textContent = hit.score.toFixed(3);
  node.querySelector(".more-like-this").addEventListener("click", () => {
    run({ kind: "similar", key: hit.key, caption: hit.caption, thumbnail: hit.thumbnail });
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  if (hit.source) addSource(hit.source);
  return node;
}

function addSource(source) {
  if (state.sources.has(source)) return;
  state.sources.add(source);
  $("source").appendChild(new Option(source, source));
}

function showQueryChip(query) {
  const chip = $("query-chip");
  if (query.kind === "text") { chip.hidden = true; return; }
  chip.hidden = false;
  const thumb = $("query-thumb");
  if (query.kind === "image") {
    if (thumb.dataset.url) URL.revokeObjectURL(thumb.dataset.url);
    thumb.dataset.url = URL.createObjectURL(query.file);
    thumb.src = thumb.dataset.url;
  } else {
    thumb.src = query.thumbnail;
  }
  $("query-label").textContent = query.kind === "image" ? "Searching by your image" : `Like: ${query.caption || query.key}`;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { setStatus(`${file.name} is not an image`, true); return; }
  $("q").value = "";
  run({ kind: "image", file });
}

async function loadIndexes() {
  const response = await fetch("/api/indexes");
  const { indexes } = await response.json();
  indexes.forEach((info) => $("index-select").appendChild(new Option(`${info.name} (${info.size})`, info.name)));
  state.index = indexes.length ? indexes[0].name : null;
}

function rerun() {
  if (state.query) run(state.query);
}

function bind() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (text) run({ kind: "text", text });
  });
  $("file").addEventListener("change", () => { searchFile($("file").files[0]); $("file").value = ""; });
  $("more").addEventListener("click", () => { if (state.nextOffset !== null) run(state.query, state.nextOffset); });
  $("index-select").addEventListener("change", () => { state.index = $("index-select").value; rerun(); });
  ["source", "collapse", "k"].forEach((id) => $(id).addEventListener("change", rerun));
  $("where").addEventListener("keydown", (event) => { if (event.key === "Enter") rerun(); });
  $("clear-query").addEventListener("click", () => { $("query-chip").hidden = true; state.query = null; $("results").replaceChildren(); setStatus("Type a query or drop an image to search."); $("more").hidden = true; });
  let depth = 0;
  document.addEventListener("dragenter", (event) => { event.preventDefault(); depth += 1; $("dropzone").hidden = false; });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("dropzone").hidden = true; });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("dropzone").hidden = true;
    searchFile(event.dataTransfer && event.dataTransfer.files[0]);
  });
}

bind();
loadIndexes().catch((error) => setStatus(`Cannot list the indexes: ${error.message}`, true));
