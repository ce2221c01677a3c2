// The fleet dashboard: fetches /v1/dashboard (same origin, the admin's mTLS session) and draws
// tables and two SVG charts. No framework, nothing loaded from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function when(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–";
}

function ago(t, now) {
  if (!t) return "never";
  const d = now - t;
  if (d < 90) return d + " s ago";
  if (d < 5400) return Math.round(d / 60) + " min ago";
  return Math.round(d / 3600) + " h ago";
}

function until(t, now) {
  if (!t) return "–";
  const d = t - now;
  if (d < 0) return "expired";
  if (d < 5400) return "in " + Math.round(d / 60) + " min";
  if (d < 172800) return "in " + Math.round(d / 3600) + " h";
  return "in " + Math.round(d / 86400) + " d";
}

function pct(x) {
  return x === null || x === undefined ? "–" : x.toFixed(1) + "%";
}

// A node's latest self-test round: ACCEPTED probes in red, else how many were refused and when.
function selftestCell(t, now) {
  if (!t) return el("td", {}, "–");
  if (t.accepted.length) return el("td", { class: "plain" }, "ACCEPTED: " + t.accepted.join(", "));
  return el("td", { class: "enc" }, `${t.refused} refused, ${ago(t.at, now)}`);
}

function fill(id, rows, cells) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "10", class: "empty" }, "none"));
    body.append(tr);
    return;
  }
  for (const r of rows) {
    const tr = el("tr");
    for (const c of cells(r)) tr.append(c);
    body.append(tr);
  }
}

// One node's capture over the chart's period: the mode as coloured bands (enforce green,
// monitor amber, off grey) and its plaintext attempts as a red step line; the title lists the
// changes. Every node's chart spans the same period (t0 to now), so the rows line up in time.
const MODE_COLOUR = { enforce: "#c6e9d0", monitor: "#f5e0a3", off: "#e4e4e4" };
function captureSpark(points, t0, now) {
  const cell = el("td");
  if (!points || points.length === 0) { cell.textContent = "–"; return cell; }
  const W = 160, H = 24;
  const t1 = Math.max(now, t0 + 1);
  const x = (t) => ((t - t0) / (t1 - t0)) * W;
  const most = Math.max(1, ...points.map((p) => p.plaintext_attempts));
  const y = (v) => H - 2 - (v / most) * (H - 4);
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "capture mode and plaintext attempts over time" });
  points.forEach((p, i) => {
    const end = i + 1 < points.length ? points[i + 1].at : t1;
    s.append(svg("rect", { x: x(p.at), y: 0, width: Math.max(1, x(end) - x(p.at)), height: H, fill: MODE_COLOUR[p.mode] || "#fff" }));
  });
  let d = "";
  points.forEach((p, i) => {
    const end = i + 1 < points.length ? points[i + 1].at : t1;
    d += (i ? " L" : "M") + x(p.at).toFixed(1) + " " + y(p.plaintext_attempts).toFixed(1) + " L" + x(end).toFixed(1) + " " + y(p.plaintext_attempts).toFixed(1);
  });
  s.append(svg("path", { d, fill: "none", stroke: "#b32d2e", "stroke-width": "1.5" }));
  s.append(svg("title", {}, points.map((p) => `${when(p.at)}: ${p.mode || "none"}, ${p.plaintext_attempts} plaintext attempts`).join("\n")));
  cell.append(s);
  return cell;
}

const CLASS = { tapproof: ["tapproof", "enc"], other_tls: ["TLS", "enc"], plaintext: ["PLAINTEXT", "plain"], allowed: ["allowed", "allowed"] };

function historyChart(points) {
  const box = document.getElementById("history");
  box.replaceChildren();
  if (points.length === 0) { box.append(el("p", { class: "empty" }, "no coverage reports yet")); return; }
  // Reports that saw no link carry no figure: the line starts at the first one that did.
  points = points.filter((p) => p.coverage_percent !== null);
  if (points.length === 0) { box.append(el("p", { class: "empty" }, "no links seen yet")); return; }
  const W = 900, H = 200, L = 40, B = 24;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "fleet coverage over time" });
  const t0 = points[0].at, t1 = Math.max(points[points.length - 1].at, t0 + 1);
  const x = (t) => L + (W - L - 10) * (t - t0) / (t1 - t0);
  const y = (p) => 10 + (H - B - 10) * (1 - p / 100);
  for (const g of [0, 50, 100]) {
    s.append(svg("line", { x1: L, x2: W - 10, y1: y(g), y2: y(g), stroke: "#ddd" }));
    s.append(svg("text", { x: 2, y: y(g) + 4, "font-size": "11" }, g + "%"));
  }
  let d = "";
  points.forEach((p, i) => { d += (i ? " L" : "M") + x(p.at).toFixed(1) + " " + y(p.coverage_percent).toFixed(1); });
  if (points.length === 1) d += " L" + (W - 10) + " " + y(points[0].coverage_percent).toFixed(1);
  s.append(svg("path", { d, fill: "none", stroke: "#00733b", "stroke-width": "2" }));
  // Monitor-mode plaintext attempts (sources let through), fleet-wide: a red step line on its own
  // scale along the bottom third, drawn only when there were any.
  const most = Math.max(0, ...points.map((p) => p.plaintext_attempts || 0));
  if (most > 0) {
    const ya = (n) => (H - B) - (H - B - 10) / 3 * n / most;
    let a = "";
    points.forEach((p, i) => { a += (i ? " L" : "M") + x(p.at).toFixed(1) + " " + ya(p.plaintext_attempts || 0).toFixed(1); });
    s.append(svg("path", { d: a, fill: "none", stroke: "#b32d2e", "stroke-width": "1.5", "stroke-dasharray": "4 2" }));
    s.append(svg("text", { x: W - 10, y: ya(most) - 3, "font-size": "11", "text-anchor": "end", fill: "#b32d2e" }, `plaintext attempts (monitor mode), up to ${most}`));
  }
  s.append(svg("text", { x: L, y: H - 6, "font-size": "11" }, when(t0)));
  s.append(svg("text", { x: W - 10, y: H - 6, "font-size": "11", "text-anchor": "end" }, when(t1)));
  box.append(s);
}

function expiryChart(nodes, now) {
  const box = document.getElementById("expiry");
  box.replaceChildren();
  const rows = nodes.filter((n) => n.cert_not_after && !n.revoked);
  if (rows.length === 0) { box.append(el("p", { class: "empty" }, "no live certificates")); return; }
  const last = Math.max(...rows.map((n) => n.cert_not_after));
  const W = 900, R = 22, L = 160, H = rows.length * R + 24;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "certificate expiry timeline" });
  const x = (t) => L + (W - L - 90) * Math.max(0, t - now) / Math.max(1, last - now);
  rows.forEach((n, i) => {
    const yy = i * R + 4;
    const soon = n.cert_not_after - now < 600;
    s.append(svg("text", { x: 0, y: yy + 14, "font-size": "12" }, n.name));
    s.append(svg("rect", { x: L, y: yy, width: Math.max(2, x(n.cert_not_after) - L), height: R - 8, fill: soon ? "#dba617" : "#72aee6" }));
    s.append(svg("text", { x: x(n.cert_not_after) + 4, y: yy + 13, "font-size": "11" }, until(n.cert_not_after, now)));
  });
  s.append(svg("text", { x: L, y: H - 4, "font-size": "11" }, "now"));
  box.append(s);
}

function render(data) {
  const now = data.generated_at;
  const f = data.fleet;
  // 100% of nothing is not coverage: with no link reported yet, say so.
  const seen = f.links || 0;
  document.getElementById("coverage").textContent = seen === 0 ? "no links seen yet" : pct(f.coverage_percent);
  document.getElementById("coverage").className = seen === 0 ? "big" : "big " + (f.plaintext > 0 ? "plain" : "enc");
  document.getElementById("links").textContent = `${f.encrypted} / ${f.plaintext}`;
  document.getElementById("nodes-reporting").textContent = `${f.nodes_reporting} of ${f.nodes}`;
  document.getElementById("status").textContent = "updated " + when(now);
  const starts = data.nodes.filter((n) => n.capture_history && n.capture_history.length).map((n) => n.capture_history[0].at);
  const t0 = starts.length ? Math.min(...starts) : now;
  fill("nodes", data.nodes, (n) => [
    el("td", {}, n.name + (n.revoked ? " (revoked)" : "")),
    el("td", { class: "mono" }, n.spiffe_id),
    el("td", {}, n.cert_not_after ? `${until(n.cert_not_after, now)} (${when(n.cert_not_after)})` : "–"),
    el("td", {}, ago(n.last_report, now)),
    el("td", { class: n.coverage_percent === null ? "" : n.plaintext ? "plain" : "enc" }, n.coverage_percent === null ? (n.last_report ? "no links seen yet" : "–") : pct(n.coverage_percent)),
    el("td", {}, n.plaintext === null ? "–" : String(n.plaintext)),
    el("td", { class: n.capture_mode === "enforce" ? "enc" : "" }, n.capture_mode || "–"),
    el("td", { class: n.plaintext_attempts ? "plain" : "" }, n.plaintext_attempts === null ? "–" : String(n.plaintext_attempts)),
    captureSpark(n.capture_history, t0, now),
    selftestCell(n.selftest, now),
  ]);
  // A self-test probe the listener accepted is an alarm: said above everything else.
  const alarms = data.nodes.filter((n) => n.selftest && n.selftest.accepted.length)
    .map((n) => `${n.name} accepted ${n.selftest.accepted.join(", ")}`);
  const alarm = document.getElementById("selftest-alarm");
  alarm.hidden = alarms.length === 0;
  alarm.textContent = alarms.length ? "SELF-TEST ALARM: a connection that must fail was accepted: " + alarms.join("; ") : "";
  fill("link-table", data.links, (l) => {
    let [label, cls] = CLASS[l.class] || [l.class, ""];
    // A node's connection to the control plane is not a link between nodes: say which it is.
    if (l.via === "control") label = "tapproof (control plane)";
    else if (l.via === "tunnel_in" || l.via === "tunnel_out") label = "tapproof tunnel";
    const ids = l.peer_id ? `${l.from_id || l.from} → ${l.peer_id}` : "–";
    const tls = l.tls_version ? `${l.tls_version} ${l.cipher} ${l.group}` : "–";
    return [
      el("td", {}, l.from), el("td", {}, l.to || "–"), el("td", { class: cls }, label),
      el("td", {}, l.service || "–"), el("td", { class: "mono" }, ids), el("td", { class: "mono" }, tls),
      el("td", { class: "mono" }, l.local), el("td", { class: "mono" }, l.remote),
      el("td", {}, l.process || "?"), el("td", {}, l.detail),
    ];
  });
  const bytes = (n) => n >= 1e9 ? (n / 1e9).toFixed(1) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : n >= 1e3 ? (n / 1e3).toFixed(1) + " kB" : n + " B";
  fill("sites", data.sites || [], (r) => [
    el("td", {}, r.node), el("td", {}, r.site || "–"), el("td", {}, r.remote_site),
    el("td", {}, r.direction === "to" ? `${r.site || r.node} → ${r.remote_site}` : `${r.remote_site} → ${r.site || r.node}`),
    el("td", {}, String(r.tcp_flows)), el("td", {}, String(r.udp_flows)),
    el("td", {}, `${bytes(r.bytes_sent)} / ${bytes(r.bytes_received)}`),
    el("td", { class: r.refused ? "plain" : "" }, String(r.refused)),
    el("td", { class: "enc" }, `${r.routed_connections} / ${r.routed_datagrams}`),
    el("td", {}, String(r.dropped_packets)),
  ]);
  fill("denials", data.denials, (d) => [
    el("td", {}, when(d.at)), el("td", {}, d.node), el("td", { class: "mono" }, d.peer),
    el("td", {}, d.service), el("td", {}, d.reason),
  ]);
  fill("ca", data.ca, (c) => [
    el("td", {}, String(c.id)), el("td", {}, c.kind),
    el("td", { class: c.state === "active" ? "enc" : "" }, c.state),
    el("td", { class: c.not_after - now < 30 * 86400 ? "plain" : "" }, `${until(c.not_after, now)} (${when(c.not_after)})`),
    el("td", {}, when(c.created_at)),
  ]);
  fill("revocations", data.revocations, (r) => [
    el("td", {}, when(r.revoked_at)), el("td", {}, r.kind), el("td", { class: "mono" }, r.value), el("td", {}, r.reason || "–"),
  ]);
  fill("audit", data.audit, (a) => [
    el("td", {}, String(a.seq)), el("td", {}, when(a.at)), el("td", { class: "mono" }, a.actor), el("td", {}, a.action),
  ]);
  historyChart(data.history);
  expiryChart(data.nodes, now);
  document.body.dataset.loaded = "true";
}

async function refresh() {
  try {
    const r = await fetch("/v1/dashboard", { cache: "no-store" });
    if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
    render(await r.json());
  } catch (e) {
    document.getElementById("status").textContent = "cannot load /v1/dashboard: " + e.message;
    document.getElementById("status").className = "warn";
  }
}

refresh();
setInterval(refresh, 15000);
