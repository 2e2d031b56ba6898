// The node dashboard: one snapshot a second over SSE, rendered into four pages.
// Everything from the network (ids, model names, reasons) goes in as text, never as HTML.
"use strict";

const state = { snap: null, charts: {}, tab: "network" };

// -- helpers ------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const short = (id) => (id || "").slice(0, 12);
const fmtNum = (v, digits = 2) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits }));
const fmtCredits = (v) => fmtNum(v, 4);
const fmtMs = (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0));
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
const fmtAge = (s) => (s < 1 ? "now" : s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`);
function pill(text, cls) { return el("span", { class: `pill ${cls || text}`, text }); }
function bar(fraction) {
  const b = el("span", { class: "bar" }); const i = el("i"); i.style.width = `${Math.round(Math.min(Math.max(fraction, 0), 1) * 100)}%`; b.append(i); return b;
}
function fill(tbody, rows, columns, emptyText) {
  tbody.replaceChildren();
  if (!rows.length) { tbody.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns), text: emptyText }))); return; }
  for (const r of rows) tbody.append(r);
}
function route(ids) {
  const span = el("span", { class: "route", "data-route": ids.join(",") });
  ids.forEach((id, i) => { if (i) span.append(el("span", { class: "arrow", text: "→" })); span.append(el("span", { title: id, text: short(id) })); });
  return span;
}
function statusPill(code) { return pill(String(code), code < 400 ? "s2xx" : code < 500 ? "s4xx" : "s5xx"); }
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// -- tabs and theme -------------------------------------------------------------------------------
function showTab() {
  const tab = (location.hash || "#network").slice(1);
  state.tab = ["network", "traffic", "credits", "backends"].includes(tab) ? tab : "network";
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === state.tab);
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("active", p.id === `page-${state.tab}`);
  resizeCharts();
  if (state.snap) render(state.snap);
}
window.addEventListener("hashchange", showTab);
document.getElementById("theme").addEventListener("click", () => {
  const order = ["auto", "dark", "light"];
  const next = order[(order.indexOf(document.documentElement.dataset.theme) + 1) % order.length];
  document.documentElement.dataset.theme = next;
  localStorage.setItem("wwwserve-theme", next);
  for (const c of Object.values(state.charts)) c.destroy();
  state.charts = {};
  if (state.snap) render(state.snap);
});

// -- charts ---------------------------------------------------------------------------------------
function chart(id, series, data) {
  const host = document.getElementById(id);
  if (!host.offsetWidth) return; // its page is hidden: drawn when shown
  let c = state.charts[id];
  if (!c) {
    const axis = { stroke: css("--muted"), grid: { stroke: css("--border"), width: 1 }, ticks: { stroke: css("--border") } };
    c = state.charts[id] = new uPlot({
      width: host.offsetWidth, height: 240,
      series: [{}, ...series.map(([label, color]) => ({ label, stroke: css(color), width: 2, spanGaps: false }))],
      axes: [axis, { ...axis, size: 56 }],
      scales: { x: { time: true, range: (u, lo, hi) => [Math.min(lo, hi - 120), hi] } },
      cursor: { points: { size: 6 } },
    }, data, host);
  } else {
    c.setData(data);
  }
}
function resizeCharts() {
  for (const [id, c] of Object.entries(state.charts)) {
    const w = document.getElementById(id).offsetWidth; if (w) c.setSize({ width: w, height: 240 });
  }
}
window.addEventListener("resize", resizeCharts);

// -- pages ----------------------------------------------------------------------------------------
function renderNetwork(s) {
  const peers = s.network.peers;
  const count = (st) => peers.filter((p) => p.state === st).length;
  document.getElementById("peer-count").textContent = String(peers.length);
  document.getElementById("peer-states").textContent = ["alive", "suspect", "dead", "left"].map((st) => `${count(st)} ${st}`).join(" · ");
  document.getElementById("peers-alive").textContent = String(count("alive"));
  document.getElementById("peers-down").textContent = `${count("suspect")} / ${count("dead")}`;
  document.getElementById("link-count").textContent = String(s.network.links.length);
  const me = peers.find((p) => p.self);
  document.getElementById("my-balance").textContent = me ? fmtCredits(me.balance) : "–";
  const duels = s.network.duels;
  for (const th of document.querySelectorAll(".quality-col")) th.style.display = duels ? "" : "none";
  fill(document.querySelector("#peers tbody"), peers.map((p) => {
    const models = p.models.join(", ") || "–";
    const quality = p.quality ? Object.entries(p.quality).map(([m, q]) => `${m} ${q}`).join(", ") : "";
    const tr = el("tr", { "data-peer": p.id },
      el("td", {}, el("code", { title: p.id, "data-field": "id", text: short(p.id) }), p.self ? el("span", { class: "badge", text: "this node" }) : null),
      el("td", { "data-field": "state" }, pill(p.state)),
      el("td", { "data-field": "models", text: models }),
      el("td", { "data-field": "load" }, bar(p.load.usage), document.createTextNode(`${p.load.running} run · ${p.load.waiting} wait`)),
      el("td", { class: "num", "data-field": "stake", text: fmtCredits(p.stake) }),
      el("td", { class: "num", "data-field": "bonded", text: fmtCredits(p.bonded) }),
      el("td", { class: "num", "data-field": "balance", "data-value": String(p.balance), text: fmtCredits(p.balance) }),
      duels ? el("td", { "data-field": "quality", text: quality }) : null,
      el("td", { class: "num", "data-field": "age", text: p.self ? "–" : fmtAge(p.age_s) }));
    return tr;
  }), 9, "No peers known yet");
  renderGraph(peers, s.network.links);
  const events = s.timeline.slice().reverse();
  const ol = document.getElementById("timeline");
  ol.replaceChildren(...(events.length ? events.map((e) => el("li", { "data-kind": e.kind },
    el("time", { text: fmtTime(e.at) }), pill(e.kind === "joined" ? "joined" : e.kind, e.kind === "joined" || e.kind === "alive" ? "alive" : e.kind),
    el("code", { title: e.id, text: short(e.id) }))) : [el("li", { class: "empty", text: "No membership events yet" })]));
}

function renderGraph(peers, links) {
  const svg = document.getElementById("graph");
  const ns = "http://www.w3.org/2000/svg";
  const w = 400, h = 300, r = Math.min(w, h) / 2 - 40;
  const pos = {};
  peers.forEach((p, i) => {
    const a = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
    pos[p.id] = [w / 2 + r * Math.cos(a), h / 2 + r * Math.sin(a)];
  });
  const nodes = [];
  for (const [a, b] of links) {
    if (!pos[a] || !pos[b]) continue;
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", pos[a][0]); line.setAttribute("y1", pos[a][1]);
    line.setAttribute("x2", pos[b][0]); line.setAttribute("y2", pos[b][1]);
    nodes.push(line);
  }
  for (const p of peers) {
    const [x, y] = pos[p.id];
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", p.self ? 11 : 9);
    c.setAttribute("class", `${p.state}${p.self ? " self" : ""}`);
    const title = document.createElementNS(ns, "title"); title.textContent = `${p.id} (${p.state})`; c.append(title);
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y + (y > h / 2 ? 26 : -16)); t.setAttribute("text-anchor", "middle");
    t.textContent = short(p.id).slice(0, 8);
    nodes.push(c, t);
  }
  svg.replaceChildren(...nodes);
}

function renderTraffic(s) {
  const pts = s.traffic.points;
  const last = pts[pts.length - 1];
  document.getElementById("rps").textContent = last ? fmtNum(last.rps, 1) : "–";
  document.getElementById("rps-split").textContent = last ? `${fmtNum(last.local, 1)} local · ${fmtNum(last.delegated, 1)} delegated · ${fmtNum(last.served_for_peers, 1)} for peers` : "";
  document.getElementById("lat").textContent = last && last.p50_ms !== null ? `${fmtMs(last.p50_ms)} / ${fmtMs(last.p95_ms)}` : "–";
  document.getElementById("ttft").textContent = last && last.ttft_p50_ms !== null ? fmtMs(last.ttft_p50_ms) : "–";
  const t = s.traffic.totals;
  document.getElementById("req-total").textContent = fmtNum(t.requests, 0);
  document.getElementById("req-split").textContent = `${fmtNum(t.delegated, 0)} delegated · ${fmtNum(t.failed, 0)} failed`;
  document.getElementById("served-total").textContent = fmtNum(t.served_for_peers, 0);
  const x = pts.map((p) => p.t);
  chart("chart-rps", [["local", "--chart1"], ["delegated", "--chart3"], ["for peers", "--chart2"], ["failed", "--chart4"]],
    [x, pts.map((p) => p.local), pts.map((p) => p.delegated), pts.map((p) => p.served_for_peers), pts.map((p) => p.failed)]);
  chart("chart-lat", [["p50", "--chart1"], ["p95", "--chart3"], ["p99", "--chart4"], ["TTFT p50", "--chart2"], ["TTFT p95", "--chart5"]],
    [x, pts.map((p) => p.p50_ms), pts.map((p) => p.p95_ms), pts.map((p) => p.p99_ms), pts.map((p) => p.ttft_p50_ms), pts.map((p) => p.ttft_p95_ms)]);
  const req = s.requests;
  document.getElementById("recent-empty").textContent = req.available ? "" : "This node keeps no request records.";
  fill(document.querySelector("#recent tbody"), req.recent.map((r) => el("tr", { "data-request": r.id },
    el("td", { text: fmtTime(r.started) }), el("td", { text: r.endpoint }), el("td", { text: r.model }),
    el("td", { "data-field": "route" }, route(r.route)), el("td", {}, statusPill(r.status)),
    el("td", { class: "num", text: `${r.prompt_tokens} / ${r.completion_tokens}` }),
    el("td", { class: "num", text: `${fmtMs(r.latency_ms)} ms` }),
    el("td", { class: "num", text: r.ttft_ms === null ? "–" : `${fmtMs(r.ttft_ms)} ms` }))), 8, "No requests yet");
  fill(document.querySelector("#failures tbody"), req.failures.map((r) => el("tr", {},
    el("td", { text: fmtTime(r.started) }), el("td", { text: r.model }), el("td", {}, route(r.route)),
    el("td", {}, statusPill(r.status)), el("td", { text: r.error || "" }))), 5, "No failures");
}

function renderCredits(s) {
  const c = s.credits;
  document.getElementById("cr-liquid").textContent = fmtCredits(c.account.liquid);
  document.getElementById("cr-bonded").textContent = `${fmtCredits(c.account.bonded)} / ${fmtCredits(c.account.unbonding)}`;
  document.getElementById("cr-earned").textContent = fmtCredits(c.earned);
  document.getElementById("cr-spent").textContent = fmtCredits(c.spent);
  document.getElementById("cr-pending").textContent = String(c.pending.count);
  document.getElementById("cr-pending-sub").textContent = c.pending.count ? `${fmtCredits(c.pending.credits)} credits, oldest ${fmtNum(c.pending.oldest_s, 1)} s` : "all paid";
  const series = c.series;
  chart("chart-credits", [["earned", "--chart2"], ["spent", "--chart4"]], [series.map((p) => p[0]), series.map((p) => p[1]), series.map((p) => p[2])]);
  fill(document.querySelector("#lag tbody"), Object.entries(c.replication).map(([peer, l]) => el("tr", { "data-peer": peer },
    el("td", {}, el("code", { title: peer, text: short(peer) })),
    el("td", { class: "num", text: String(l.missing_here) }), el("td", { class: "num", text: String(l.missing_there) }))), 3, "No peer answered yet");
  fill(document.querySelector("#ops tbody"), c.latest.map((op) => el("tr", {},
    el("td", { text: fmtTime(op.ts) }), el("td", {}, el("code", { title: op.author, text: short(op.author) })),
    el("td", { class: "num", text: String(op.seq) }), el("td", { text: op.kind }), el("td", { text: op.summary }))), 5, "No operations yet");
  fill(document.querySelector("#balances tbody"), s.network.peers.map((p) => el("tr", { "data-balance": p.id },
    el("td", {}, el("code", { title: p.id, text: short(p.id) }), p.self ? el("span", { class: "badge", text: "this node" }) : null),
    el("td", { class: "num", "data-field": "liquid", "data-value": String(p.balance), text: fmtCredits(p.balance) }),
    el("td", { class: "num", text: fmtCredits(p.bonded) }), el("td", { class: "num", text: fmtCredits(p.unbonding) }),
    el("td", {}, p.barred ? pill("barred", "dead") : null))), 5, "No accounts");
}

function renderBackends(s) {
  const now = s.node.now;
  fill(document.querySelector("#backends tbody"), s.backends.map((b) => {
    const lim = b.limits, used = b.last_minute;
    const limits = [lim.rpm ? `${used.requests}/${lim.rpm} rpm` : `${used.requests} req`, lim.tpm ? `${used.tokens}/${lim.tpm} tpm` : `${used.tokens} tok`,
      lim.max_parallel_requests ? `${b.in_flight}/${lim.max_parallel_requests} parallel` : null].filter(Boolean).join(" · ");
    const cooling = b.cooldown_until && b.cooldown_until > now;
    return el("tr", { "data-backend": b.id },
      el("td", {}, el("code", { text: b.id })), el("td", { text: b.model }), el("td", { text: b.provider || "" }),
      el("td", {}, pill(b.ready ? "ready" : "starting")), el("td", { class: "num", text: String(b.in_flight) }),
      el("td", {}, b.load ? bar(b.load.usage) : null, document.createTextNode(b.load ? `${b.load.running} run · ${b.load.waiting} wait` : "no probe")),
      el("td", { text: limits }),
      el("td", {}, cooling ? pill(`${Math.ceil(b.cooldown_until - now)} s`, "cooldown") : document.createTextNode(b.cooldown_reason || "–")));
  }), 8, "No deployments");
}

function render(s) {
  state.snap = s;
  document.getElementById("node-id").textContent = short(s.node.id);
  document.getElementById("node-id").title = s.node.id;
  document.getElementById("network-name").textContent = s.node.network_name;
  document.title = `wwwserve · ${short(s.node.id)}`;
  ({ network: renderNetwork, traffic: renderTraffic, credits: renderCredits, backends: renderBackends })[state.tab](s);
  document.body.dataset.updated = String(s.node.now);
}

// -- the live feed --------------------------------------------------------------------------------
function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/ui/api/events");
  source.onopen = () => { live.className = "live on"; live.textContent = "live"; };
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.onerror = () => {
    live.className = "live off"; live.textContent = "reconnecting";
    if (source.readyState === EventSource.CLOSED) { source.close(); setTimeout(connect, 2000); }
  };
}
showTab();
fetch("/ui/api/snapshot", { credentials: "same-origin" }).then((r) => (r.ok ? r.json() : null)).then((s) => s && render(s));
connect();
