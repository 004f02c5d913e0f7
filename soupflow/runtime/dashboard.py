"""The live dashboard the admin endpoint serves at `/`: one HTML page, no build step, nothing
fetched from the internet. It polls `/api/status` every two seconds and draws, per workflow,
its listener, its counts, the oldest pending age and a small chart of the last minutes'
throughput (kept in the page), and the dead messages with retry and purge buttons (the same
operations as `soupflow dead`). Its write requests carry `X-Soupflow-Request: dashboard`,
which a cross-site form cannot send, and the admin token when the page was opened with
`#token=...`. It shows no more than `soupflow dead list` does."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>soupflow</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#f6f8fa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eaeef2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.listening{color:#1a7f37}.failed,.refused,.invalid{color:#cf222e}.muted{color:#57606a}
button{font:inherit;padding:.1em .6em;margin-right:.3em}
svg{display:block}
</style></head><body>
<h1>soupflow</h1><div class="muted" id="updated">connecting...</div>
<h2>Workflows</h2>
<table><thead><tr><th>workflow</th><th>port</th><th>state</th><th>received</th>
<th>queued</th><th>processing</th><th>completed</th><th>filtered</th><th>dead</th>
<th>oldest pending</th><th>throughput (last minutes)</th></tr></thead>
<tbody id="workflows"></tbody></table>
<h2>Dead messages</h2>
<table><thead><tr><th>RequestId</th><th>workflow</th><th>calling AE</th><th>activity</th>
<th>attempts</th><th>reason</th><th></th></tr></thead><tbody id="dead"></tbody></table>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const history = {};
function headers(extra) {
  const h = Object.assign({"X-Soupflow-Request": "dashboard"}, extra || {});
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return seconds < 120 ? seconds.toFixed(0) + " s" : (seconds / 60).toFixed(0) + " min";
}
function chart(points) {
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", "160"); svg.setAttribute("height", "28");
  const top = Math.max(1, ...points);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#0969da");
  line.setAttribute("points", points.map((v, i) => (i * 160 / Math.max(1, points.length - 1))
    .toFixed(1) + "," + (27 - v * 26 / top).toFixed(1)).join(" "));
  svg.appendChild(line); return svg;
}
async function act(kind, id) {
  await fetch("api/dead/" + kind, {method: "POST", body: JSON.stringify({ids: [id]}),
    headers: headers({"Content-Type": "application/json"})});
  refresh();
}
async function refresh() {
  let data;
  try {
    const answer = await fetch("api/status", {headers: headers()});
    data = await answer.json();
  } catch (e) { document.getElementById("updated").textContent = "not reachable"; return; }
  const body = document.getElementById("workflows"); body.replaceChildren();
  for (const w of data.workflows) {
    const done = w.received;
    const h = history[w.workflow_id] = history[w.workflow_id] || [];
    h.push([data.time, done]); while (h.length > 90) h.shift();
    const rates = h.slice(1).map((p, i) => Math.max(0, (p[1] - h[i][1]) / Math.max(0.001, p[0] - h[i][0])));
    const row = body.insertRow(); row.dataset.workflow = w.workflow_id;
    cell(row, w.name || w.workflow_id);
    cell(row, w.port === null ? "" : String(w.port));
    cell(row, w.state, w.state);
    for (const key of ["received", "queued", "processing", "completed", "filtered", "dead"]) {
      cell(row, String(w[key]), "n").dataset.count = key;
    }
    cell(row, age(w.oldest_pending_seconds), "n");
    cell(row, "").appendChild(chart(rates.length ? rates : [0]));
  }
  const dead = document.getElementById("dead"); dead.replaceChildren();
  for (const d of data.dead) {
    const row = dead.insertRow(); row.dataset.request = d.request_id;
    for (const text of [d.request_id, d.workflow, d.calling_aet, d.activity, String(d.attempts), d.reason]) {
      cell(row, text);
    }
    const buttons = cell(row, "");
    for (const kind of ["retry", "purge"]) {
      const b = document.createElement("button"); b.textContent = kind; b.className = kind;
      b.onclick = () => act(kind, d.request_id); buttons.appendChild(b);
    }
  }
  document.getElementById("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString();
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
