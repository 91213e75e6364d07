// mmsearch gallery: plain script, no build step, nothing loaded from elsewhere.
// Everything that comes from the index (names, texts) is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const K = 48;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function call(url, options) {
  const response = await fetch(url, Object.assign({ credentials: "same-origin" }, options));
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
  more.addEventListener("click", () => navigate({ similar: String(result.id), target: $("target").value }));
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
  return el("figure", { className: "image result" }, [link, caption, more]);
}

function show(results, what) {
  $("results").replaceChildren(...results.map(card));
  setStatus(results.length ? results.length + " results for " + what : "no results for " + what);
}

function params() {
  return new URLSearchParams(window.location.search);
}

async function run() {
  const p = params();
  const target = p.get("target") || "";
  $("target").value = target;
  const extra = "&k=" + K + (target ? "&target=" + encodeURIComponent(target) : "");
  try {
    if (p.get("similar")) {
      setStatus("searching…");
      const id = p.get("similar");
      show(await call("/api/similar/" + encodeURIComponent(id) + "?" + extra.slice(1)), "item " + id);
    } else if (p.get("q")) {
      const q = p.get("q");
      $("q").value = q;
      setStatus("searching…");
      show(await call("/api/search?q=" + encodeURIComponent(q) + extra), "“" + q + "”");
    }
  } catch (err) {
    setStatus(err.message, true);
  }
}

function navigate(state) {
  const p = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value) p.set(key, value);
  history.pushState(null, "", "?" + p.toString());
  run();
}

async function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  const target = $("target").value;
  if (target) form.append("target", target);
  form.append("k", String(K));
  setStatus("searching by " + file.name + "…");
  try {
    const results = await call("/api/search/image", { method: "POST", body: form });
    history.pushState(null, "", "?");  // an uploaded image cannot be bookmarked
    show(results, "image " + file.name);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function footer() {
  try {
    const info = await call("/api/info");
    const model = info.model ? info.model.name + " / " + (info.model.pretrained || "random") : "no model yet";
    $("footer").textContent = "model " + model + " · " + info.images + " images · " + info.texts +
      " texts · " + info.files + " files";
  } catch (err) {
    $("footer").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (q) navigate({ q: q, target: $("target").value });
  });
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
