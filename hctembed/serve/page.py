"""The web page ``hctembed serve`` answers ``GET /`` with: one self-contained HTML document (no build step, no
external script, style or font), which calls the JSON API. Search by scan id (``/?id=SCAN`` searches at once)
or by dropping a scan file; the query and its hits appear as thumbnails with score, scan id and positive
labels, and clicking a hit searches from it. With a token configured, the page asks for it once and keeps it
for the tab (sessionStorage)."""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hctembed search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { background: #111; color: #eee; font-family: sans-serif; margin: 16px; }
form, #drop { display: inline-block; margin: 0 12px 12px 0; vertical-align: top; }
input, select, button { background: #222; color: #eee; border: 1px solid #555; padding: 4px 6px; }
#drop { border: 2px dashed #666; padding: 10px 18px; color: #aaa; }
#drop.over { border-color: #4af; color: #fff; }
#status { color: #fc6; min-height: 1.2em; }
main { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: #222; padding: 6px; border-radius: 4px; width: 160px; cursor: pointer; }
figure.query { outline: 2px solid #4af; cursor: default; }
figure img { display: block; width: 150px; min-height: 60px; background: #000; }
figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.score { color: #8f8; }
</style></head>
<body>
<h1>hctembed search</h1>
<form id="byid"><input id="sid" placeholder="scan id" size="28" required>
  k <input id="k" type="number" value="8" min="1" max="100" style="width: 4em">
  <select id="model"><option value="">most recent model</option></select>
  <button>search</button></form>
<div id="drop">drop a scan (.nii, .nii.gz, .zip of one DICOM series) or
  <input id="file" type="file" accept=".nii,.gz,.zip"></div>
<p id="status"></p>
<main id="hits"></main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function token() { return sessionStorage.getItem("hctembed-token"); }
async function api(path, options = {}) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  let response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const given = prompt("This server needs its access token:");
    if (given) { sessionStorage.setItem("hctembed-token", given); return api(path, options); }
  }
  return response;
}
function status(text) { $("status").textContent = text; }
function modelParam(sep) {
  const model = $("model").value;
  return model ? sep + "model=" + encodeURIComponent(model) : "";
}
async function thumbnail(img, scanId) {
  const r = await api("/api/scans/" + encodeURIComponent(scanId) + "/thumbnail.png" + modelParam("?"));
  if (r.ok) {
    img.onload = () => { img.dataset.loaded = "1"; };
    img.src = URL.createObjectURL(await r.blob());
  } else { img.alt = "no picture"; img.dataset.loaded = "0"; }
}
function card(title, hit, isQuery) {
  const fig = document.createElement("figure");
  fig.className = isQuery ? "query" : "hit";
  const img = document.createElement("img");
  img.alt = hit.scan_id || "query";
  fig.appendChild(img);
  const cap = document.createElement("figcaption");
  const positive = Object.entries(hit.labels || {}).filter(([, v]) => v === 1).map(([k]) => k);
  const lines = [title, hit.scan_id || "uploaded file"];
  if (hit.score !== undefined) lines.push("cosine " + hit.score.toFixed(4));
  lines.push("labels: " + (positive.length ? positive.join(", ") : "none positive"));
  lines.forEach((line, i) => {
    const span = document.createElement(i === 2 && hit.score !== undefined ? "span" : "div");
    if (span.tagName === "SPAN") { span.className = "score"; }
    span.textContent = line; cap.appendChild(span);
    if (span.tagName === "SPAN") cap.appendChild(document.createElement("br"));
  });
  if (hit.viewer) {  // --viewer-url: the study in the PACS viewer
    const a = document.createElement("a"); a.href = hit.viewer; a.target = "_blank"; a.rel = "noopener";
    a.textContent = "open in viewer"; a.onclick = (e) => e.stopPropagation(); cap.appendChild(a);
  }
  fig.appendChild(cap);
  if (hit.scan_id) thumbnail(img, hit.scan_id);
  if (!isQuery && hit.scan_id) fig.onclick = () => { $("sid").value = hit.scan_id; searchId(); };
  return fig;
}
function show(result, queryCard) {
  const main = $("hits");
  main.replaceChildren(queryCard, ...result.hits.map((h) => card("#" + h.rank, h, false)));
  status(result.hits.length + " hits (" + result.query.model_id + ")");
}
async function searchId() {
  const id = $("sid").value.trim();
  if (!id) return;
  status("searching ...");
  const r = await api("/api/search?id=" + encodeURIComponent(id) + "&k=" + $("k").value + modelParam("&"));
  const body = await r.json();
  if (!r.ok) { status(body.error); return; }
  const scan = await api("/api/scans/" + encodeURIComponent(id));
  const labels = scan.ok ? (await scan.json()).labels : {};
  history.replaceState(null, "", "?id=" + encodeURIComponent(id));
  show(body, card("query", { scan_id: id, labels }, true));
}
async function searchFile(file) {
  status("embedding the file and searching ...");
  const form = new FormData();
  form.append("file", file);
  const r = await api("/api/search?k=" + $("k").value + modelParam("&"), { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) { status(body.error); return; }
  show(body, card("query", {}, true));
}
$("byid").onsubmit = (e) => { e.preventDefault(); searchId(); };
$("file").onchange = (e) => { if (e.target.files.length) searchFile(e.target.files[0]); };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
};
(async () => {
  const r = await api("/health");
  if (r.ok) {
    const h = await r.json();
    for (const m of h.models) {
      const o = document.createElement("option");
      o.value = m.model_id;
      o.textContent = m.model_id + " (" + m.vectors + ")";
      $("model").appendChild(o);
    }
    status(h.scans + " scans");
  }
  const wanted = new URLSearchParams(location.search).get("id");
  if (wanted) { $("sid").value = wanted; searchId(); }
})();
</script>
</body></html>
"""
