// mmsearch gallery: plain script, no build step, nothing loaded from elsewhere.
// Everything that comes from the index (names, texts) is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const K = 48;
// The choices a search carries besides its query, each with the value the API takes when it is left out
// (the model's is the index's default, known once /api/info answers). Defaults stay out of the URL.
const CHOICES = { target: "", mode: "hybrid", sort: "score", model: "" };
let defaultModel = "";
let latest = 0;  // the newest search: an older answer arriving late (switches flipped quickly) is dropped
let info = null;  // /api/info's answer, once it has come
let shownModel = null;  // the model asked for by the results on show ("": the default); null: none on show
let imageOnShow = null;  // the File of the image search on show: a changed switch searches with it again
const MODE_OFF = "Only for a text search: “More like this” and an image search always match by meaning";

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, Object.assign({ credentials: "same-origin" }, options));
  } catch (err) {  // no HTTP answer at all (fetch says only "Failed to fetch")
    throw new Error("the server does not answer: is mmsearch serve still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) {
    $("login").hidden = false;
    $("token").focus();
  }
  if (!response.ok) {
    throw new Error((body && body.error) || ("request failed: " + response.status));
  }
  return body;
}

function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

function baseName(path) {
  const parts = path.split(/[\\/]/);
  return parts[parts.length - 1];
}

function card(result) {
  const name = baseName(result.path);
  const score = el("span", { className: "score", textContent: result.score.toFixed(3) });
  const more = el("button", { type: "button", className: "more", textContent: "More like this" });
  more.addEventListener("click", () => navigate(Object.assign({ similar: String(result.id) }, choices())));
  if (result.kind === "text") {
    const where = el("span", { className: "name", textContent: name + ":" + result.line, title: result.path });
    return el("figure", { className: "text result" }, [
      el("blockquote", { textContent: result.text }), el("figcaption", {}, [score, where]), more]);
  }
  const img = el("img", { src: "/thumb/" + result.id, alt: name, loading: "lazy" });
  const link = el("a", { className: "open", href: "/file/" + result.id, target: "_blank", rel: "noopener",
                         title: result.path }, [img]);
  link.setAttribute("aria-label", "open " + name);
  const caption = el("figcaption", {}, [score, el("span", { className: "name", textContent: name })]);
  if (result.taken) caption.append(el("span", { className: "taken", textContent: result.taken.replace("T", " ") }));
  return el("figure", { className: "image result" }, [link, caption, more]);
}

// A query or file name for the status line: a long one is cut short, so the line stays one line.
function clip(text) {
  return text.length > 80 ? text.slice(0, 79) + "…" : text;
}

function show(results, what, model) {
  $("results").replaceChildren(...results.map(card));
  setStatus(results.length ? results.length + " results for " + what : "no results for " + what);
  shownModel = model;
  showFooter();
}

// No results on show, with `text` on the status line: after a failed search (so no results of an
// earlier one look like its own) or where the URL holds no search.
function nothingShown(text, isError) {
  $("results").replaceChildren();
  setStatus(text, isError);
  shownModel = null;
  showFooter();
}

// The mode switch applies to text searches only; it keeps its value while it does not.
function modeApplies(yes) {
  const mode = $("mode");
  if (mode.dataset.title === undefined) mode.dataset.title = mode.title;
  mode.disabled = !yes;
  mode.title = yes ? mode.dataset.title : MODE_OFF;
}

function params() {
  return new URLSearchParams(window.location.search);
}

function fallback(name) {
  return name === "model" ? defaultModel : CHOICES[name];
}

// The form's current choices, by parameter name.
function choices() {
  const out = {};
  for (const name of Object.keys(CHOICES)) out[name] = $(name).value;
  return out;
}

// Show the URL's choices on the form; a value the form does not offer (an old or foreign link) shows
// the default, while the request still sends it, so the API's error says what is wrong.
function restore(p) {
  for (const name of Object.keys(CHOICES)) {
    const control = $(name);
    control.value = p.get(name) || fallback(name);
    if (control.selectedIndex < 0) control.value = fallback(name);
  }
}

// The API's query string: the URL's `names` that are set, and k.
function apiQuery(p, names) {
  const out = new URLSearchParams();
  for (const name of names) if (p.get(name)) out.set(name, p.get(name));
  out.set("k", String(K));
  return out.toString();
}

async function run() {
  const p = params();
  const mine = ++latest;
  restore(p);
  imageOnShow = null;
  modeApplies(!p.get("similar"));
  try {
    let url, what;
    if (p.get("similar")) {
      url = "/api/similar/" + encodeURIComponent(p.get("similar")) + "?" + apiQuery(p, ["target", "sort", "model"]);
      what = "item " + clip(p.get("similar"));
    } else if (p.get("q")) {
      $("q").value = p.get("q");
      url = "/api/search?" + apiQuery(p, ["q", "target", "mode", "sort", "model"]);
      what = "“" + clip(p.get("q")) + "”";
    } else {  // no search here (back to the start, or to an image search, which a URL cannot hold)
      nothingShown("");
      return;
    }
    setStatus("searching…");
    const results = await call(url);
    if (mine === latest) show(results, what, p.get("model") || "");
  } catch (err) {
    if (mine === latest) nothingShown(err.message, true);
  }
}

function pageUrl(state) {
  const p = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value && value !== fallback(key)) p.set(key, value);
  return "?" + p.toString();
}

function navigate(state) {
  const url = pageUrl(state);
  // The same search again (Enter pressed twice) is one step of history, so Back leaves it.
  if (url === (window.location.search || "?")) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  run();
}

// A changed choice applies to the search on show (an image search is made again with the same file).
function rerun() {
  const p = params();
  if (imageOnShow) searchImage(imageOnShow);
  else if (p.get("similar")) navigate(Object.assign({ similar: p.get("similar") }, choices()));
  else if (p.get("q")) navigate(Object.assign({ q: p.get("q") }, choices()));
  else {
    history.replaceState(null, "", pageUrl(choices()));
    showFooter();  // nothing on show: the footer names the model chosen
  }
}

async function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  const chosen = choices();
  for (const name of ["target", "sort", "model"]) if (chosen[name]) form.append(name, chosen[name]);
  form.append("k", String(K));
  const mine = ++latest;
  modeApplies(false);
  setStatus("searching by " + clip(file.name) + "…");
  try {
    const results = await call("/api/search/image", { method: "POST", body: form });
    if (mine !== latest) return;
    history.pushState(null, "", pageUrl(chosen));  // an uploaded image cannot be bookmarked, its choices can
    imageOnShow = file;
    show(results, "image " + clip(file.name), chosen.model);
  } catch (err) {
    if (mine === latest) {
      nothingShown(err.message, true);
      modeApplies(true);  // nothing on show: the switch is for the next search, a text one or not
    }
  }
}

// The model selector, shown when the index has several models; the default preselected.
function showModels(models) {
  const select = $("model");
  select.replaceChildren(...models.map((m) => el("option", {
    value: m.key, title: m.name,
    textContent: baseName(m.name) + " / " + (m.pretrained ? baseName(m.pretrained) : "random") + ", dim " + m.dim,
  })));
  const chosen = models.find((m) => m.default);
  defaultModel = chosen ? chosen.key : "";
  select.hidden = models.length < 2;
  restore(params());
}

// The footer: the model of the results on show (with none, the one chosen) and the index's counts.
function showFooter() {
  if (!info) return;
  const asked = shownModel !== null ? shownModel : $("model").value;
  const models = info.models || [];
  // The URL may name a model by key or by name; none: the index's default.
  const used = models.find((m) => (asked ? m.key === asked || m.name === asked : m.default)) || info.model;
  const model = used ? used.name + " / " + (used.pretrained || "random") : "no model yet";
  $("footer").textContent = "model " + model + " · " + info.images + " images · " + info.texts +
    " texts · " + info.files + " files";
}

async function footer() {
  try {
    info = await call("/api/info");
    showModels(info.models || []);
    showFooter();
  } catch (err) {
    $("footer").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (q) navigate(Object.assign({ q: q }, choices()));
  });
  for (const name of Object.keys(CHOICES)) $(name).addEventListener("change", rerun);
  $("image").addEventListener("change", () => searchImage($("image").files[0]));
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await call("/login", { method: "POST", body: new URLSearchParams({ token: $("token").value }) });
      $("login").hidden = true;
      $("token").value = "";
      footer();
      run();
    } catch (err) {
      setStatus(err.message, true);
    }
  });
  let depth = 0;
  window.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; $("drop").hidden = false; });
  window.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); $("drop").hidden = depth > 0 ? false : true; });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) searchImage(file);
  });
  window.addEventListener("popstate", run);
  footer();
  run();
});
