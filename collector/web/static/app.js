// certmon dashboard: plain JS, no build step, no external assets.
// Every value from the API is inserted with textContent / setAttribute, never as
// HTML: device ids and certificate subjects come from the field.
"use strict";

const REFRESH_MS = 15000;
const GROUPS = [
  { key: "client", label: "client certificates" },
  { key: "ca", label: "CAs (intermediate + root)" },
  { key: "broker", label: "broker certificates" },
];
const STATE_LABEL = { ok: "ok", warning: "warning", critical: "critical", clock: "clock", offline: "offline" };
const SVG_NS = "http://www.w3.org/2000/svg";

const view = { sort: "risk", timeline: null, timer: null };

// ---------------------------------------------------------------- errors
// Shown on the page too: an operator (and the browser test) sees a broken
// dashboard instead of a silently stale one.
function reportError(message) {
  const box = document.getElementById("errors");
  if (!box) return;
  box.hidden = false;
  const line = document.createElement("p");
  line.textContent = String(message);
  box.appendChild(line);
}
window.addEventListener("error", (ev) => reportError(`${ev.message} (${ev.filename}:${ev.lineno})`));
window.addEventListener("unhandledrejection", (ev) => reportError(`unhandled: ${ev.reason}`));

// ---------------------------------------------------------------- helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return el;
}

async function getJSON(path) {
  const res = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

function fill(tbodyOrId, rows, emptyText, columns) {
  const tbody = typeof tbodyOrId === "string" ? document.querySelector(`#${tbodyOrId} tbody`) : tbodyOrId;
  tbody.replaceChildren();
  if (!rows.length) {
    tbody.appendChild(h("tr", {}, h("td", { colspan: columns, class: "empty" }, emptyText)));
    return;
  }
  for (const r of rows) tbody.appendChild(r);
}

function when(iso) {
  if (!iso) return "—";
  return iso.replace("T", " ").replace("Z", " UTC");
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 90) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function days(d) {
  if (d === null || d === undefined) return "—";
  if (d < 0) return `expired ${Math.abs(d).toFixed(1)} d ago`;
  return `${d.toFixed(1)} d`;
}

function seconds(s) {
  if (s === null || s === undefined) return "—";
  const a = Math.abs(s);
  const sign = s < 0 ? "−" : "+";
  if (a >= 86400) return `${sign}${(a / 86400).toFixed(1)} d`;
  if (a >= 3600) return `${sign}${(a / 3600).toFixed(1)} h`;
  if (a >= 60) return `${sign}${(a / 60).toFixed(1)} min`;
  return `${sign}${a.toFixed(2)} s`;
}

function badge(state) {
  return h("span", { class: `badge s-${state}` }, STATE_LABEL[state] || state);
}

function deviceLink(id) {
  return id ? h("a", { href: `#/device/${encodeURIComponent(id)}` }, id) : "—";
}

function short(sha) {
  return sha ? sha.slice(0, 16) : "—";
}

// ---------------------------------------------------------------- overview
function renderTiles(s) {
  const d = s.devices;
  const tiles = [
    ["Devices", d.total, "total"],
    ["OK", d.ok, "ok"],
    ["Warning", d.warning, "warning"],
    ["Critical", d.critical, "critical"],
    ["Clock problem", d.clock, "clock"],
    ["Offline", d.offline, "offline"],
    ["Expiring ≤ 14 d", s.devices_expiring["14d"], "warning"],
    ["Active alerts", s.alerts_active, s.alerts_active ? "critical" : "ok"],
    ["Rejected messages", s.rejected ? s.rejected.total : "—", s.rejected && s.rejected.total ? "warning" : "ok"],
    ["Scans failing", `${s.scans.failing} / ${s.scans.targets}`, s.scans.failing ? "warning" : "ok"],
  ];
  const ul = document.getElementById("tiles");
  ul.replaceChildren(...tiles.map(([label, value, kind]) =>
    h("li", { class: `tile t-${kind}` }, h("span", { class: "tile-value" }, String(value)),
      h("span", { class: "tile-label" }, label))));
}

function renderTimeline(t) {
  view.timeline = t;
  const measure = document.getElementById("timeline-measure").value;
  // "later" is left off the chart: long-lived CAs would flatten every weekly bar.
  const buckets = [{ week: "expired", label: "expired", counts: t.expired[measure] }]
    .concat(t.weeks.map((w) => ({ week: w.week, label: w.week.slice(5), start: w.start, counts: w[measure] })));
  const total = (b) => GROUPS.reduce((a, g) => a + (b.counts[g.key] || 0), 0);
  const max = Math.max(1, ...buckets.map(total));
  const W = 900, H = 240, left = 44, bottom = 40, top = 10, gap = 14;
  const bw = (W - left - 10 - gap) / buckets.length;
  const scale = (H - bottom - top) / max;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "timeline-title", class: "bars" });
  root.appendChild(svg("title", { id: "timeline-title" }, `Expiry timeline: ${measure} per week, by role`));
  for (const v of [...new Set([0, Math.round(max / 2), max])]) {
    const y = H - bottom - v * scale;
    root.appendChild(svg("line", { x1: left, x2: W - 10, y1: y, y2: y, class: "grid" }));
    root.appendChild(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, String(v)));
  }
  buckets.forEach((b, i) => {
    const x = left + i * bw + (i ? gap : 0);
    let y = H - bottom;
    const expired = b.week === "expired";
    const g = svg("g", { "data-week": b.week, class: expired ? "bucket expired" : "bucket" });
    if (expired) g.appendChild(svg("rect", { x, y: top, width: bw, height: H - bottom - top, class: "expired-bg" }));
    const parts = [];
    for (const grp of GROUPS) {
      const n = b.counts[grp.key] || 0;
      parts.push(`${n} ${grp.label}`);
      if (!n) continue;
      const hgt = Math.max(1, n * scale);
      y -= hgt;
      g.appendChild(svg("rect", { x: x + 2, y, width: Math.max(1, bw - 4), height: hgt,
        class: `r-${grp.key}`, "data-group": grp.key, "data-count": n }));
    }
    const name = expired ? "Already expired" : `Week ${b.week} (from ${b.start.slice(0, 10)})`;
    g.appendChild(svg("title", {}, `${name}: ${parts.join(", ")}`));
    root.appendChild(g);
    if (expired || i % 4 === 2) {
      root.appendChild(svg("text", { x: x + bw / 2, y: H - bottom + 16, class: expired ? "axis axis-expired" : "axis", "text-anchor": "middle" }, b.label));
    }
  });
  root.appendChild(svg("text", { x: left, y: H - 6, class: "axis" }, "ISO week of notAfter →"));
  document.getElementById("timeline").replaceChildren(root);
  const later = total({ counts: t.later[measure] });
  document.getElementById("timeline-legend").replaceChildren(...GROUPS.map((g) =>
    h("li", {}, h("span", { class: `swatch r-${g.key}`, "aria-hidden": "true" }), g.label)),
    h("li", {}, `${later} more after ${t.weeks.length} weeks`));
}

async function loadDevices() {
  const params = new URLSearchParams({ sort: view.sort, limit: "100" });
  const state = document.getElementById("f-state").value;
  const q = document.getElementById("f-q").value.trim();
  if (state) params.set("state", state);
  if (q) params.set("q", q);
  const data = await getJSON(`/api/devices?${params}`);
  const rows = data.items.map((d) => h("tr", { "data-device": d.device_id, "data-state": d.state },
    h("th", { scope: "row" }, deviceLink(d.device_id)),
    h("td", {}, badge(d.state)),
    h("td", { title: d.worst_message || "" }, d.worst_code || "—"),
    h("td", { class: "subject" }, d.subject || "—"),
    h("td", { class: d.days_left !== null && d.days_left < 0 ? "num bad" : "num" }, days(d.days_left)),
    h("td", { title: when(d.last_seen_at) }, ago(d.last_seen_at)),
    h("td", { class: "num" }, offsetText(d.clock_offset_lo_s, d.clock_offset_hi_s))));
  fill("devices-table", rows, "No devices match.", 7);
  document.getElementById("devices-count").textContent =
    `Showing ${data.items.length} of ${data.total} matching devices.`;
  for (const th of document.querySelectorAll("#devices-table th[data-sort]")) {
    const key = th.dataset.sort;
    th.setAttribute("aria-sort", view.sort === key ? "ascending" : view.sort === `-${key}` ? "descending" : "none");
  }
}

function offsetText(lo, hi) {
  if (lo === null && hi === null) return "—";
  if (lo === null || hi === null) return seconds(lo === null ? hi : lo);
  return `${seconds(lo)} … ${seconds(hi)}`;
}

function renderCas(c) {
  const rows = c.cas.map((a) => h("tr", {},
    h("th", { scope: "row", class: "subject", title: a.sha256 }, a.subject),
    h("td", {}, when(a.not_after)),
    h("td", { class: a.days_left < 30 ? "num bad" : "num" }, days(a.days_left)),
    h("td", { class: "num" }, String(a.trust_devices)),
    h("td", { class: "num" }, String(a.chain_devices)),
    h("td", {}, a.requirement ? `${a.requirement.name} (${a.requirement.status})` : "—")));
  fill("cas-table", rows, "No CAs reported yet.", 6);
  const reqs = c.requirements.map((r) => {
    const pct = r.share_holding === null ? null : Math.round(r.share_holding * 100);
    const sample = r.sample_devices.slice(0, 8);
    const who = r.status === "required" ? r.devices_missing : r.devices_holding;
    return h("tr", {},
      h("th", { scope: "row" }, r.name, h("br"), h("small", { class: "mono" }, short(r.sha256))),
      h("td", {}, r.status),
      h("td", {}, pct === null ? "—" : `${r.devices_holding} (${pct} %)`,
        pct === null ? null : h("meter", { min: 0, max: 100, value: pct, "aria-label": `${pct} percent hold it` })),
      h("td", {}, `${who} `, ...sample.map((id) => h("span", { class: "chip" }, deviceLink(id))),
        who > sample.length ? "…" : null));
  });
  fill("req-table", reqs, "No [[trust_requirements]] configured.", 4);
  document.getElementById("req-hint").textContent =
    `${c.devices_with_trust_store} devices have reported their trust store. “Required”: who breaks when the old CA goes; “retiring”: who still depends on it.`;
}

// A scan's verdict (its severity) and its worst reason, in full on hover. A probe
// that ended early can still be a verdict (a broker refusing us for want of a client
// certificate is CLIENT_CERT_REQUIRED, OK): the severity decides, not the error.
function scanVerdict(s) {
  const state = { ok: "ok", info: "ok", warning: "warning", critical: "critical" }[s.severity];
  if (!state) return [h("span", { class: "badge s-critical" }, "failed"), s.error ? ` ${s.error}` : ""];
  const worst = (s.findings || [])[0];
  return [badge(state), worst ? h("span", { title: worst.message || "" }, ` ${worst.code}`) : ""];
}

function renderBrokers(b) {
  fill("scans-table", b.scanned.map((s) => h("tr", {},
    h("th", { scope: "row" }, s.target),
    h("td", {}, ago(s.scanned_at)),
    h("td", { "data-verdict": s.severity }, ...scanVerdict(s)),
    h("td", { class: "subject" }, s.chain.length ? `${s.chain[0].subject} (${s.chain[0].ref})` : "—"),
    h("td", {}, when(s.earliest_expiry)))), "No scans stored.", 5);
  fill("seen-table", b.seen_by_devices.map((s) => {
    const leaf = s.chain[0] || {};
    const vs = s.matches_scan === null ? "not scanned" : s.matches_scan ? "same as scan" : "differs from scan";
    return h("tr", { class: s.matches_scan === false ? "mismatch" : null },
      h("th", { scope: "row" }, s.endpoint),
      h("td", { class: "subject" }, `${leaf.subject || "—"} (${leaf.ref || "?"})`),
      h("td", {}, when(leaf.not_after)),
      h("td", { class: "num" }, String(s.devices)),
      h("td", {}, s.matches_scan === false ? h("span", { class: "badge s-critical" }, vs) : vs));
  }), "No device has reported a broker chain.", 5);
  // The broker hosts' own files ([broker] in agent.toml): one row per file, CRL
  // and served-versus-disk comparison, so an expiring CRL or an unreloaded
  // certfile has a line of its own.
  const rows = [];
  for (const host of b.hosts || []) {
    for (const e of host.endpoints) {
      const who = [deviceLink(host.device_id)];
      if (e.served || e.served_error) {
        const drift = e.is_reloaded === false;
        rows.push(h("tr", { class: drift ? "mismatch" : null },
          h("th", { scope: "row" }, ...who), h("td", {}, e.name, h("br"), h("small", { class: "mono" }, e.at)),
          // A bridge's "served" is what its remote presented to the agent's probe.
          h("td", { class: "subject" }, e.served ? `${e.kind === "bridge" ? "remote presents" : "served"}: ${e.served.subject} (${e.served.ref})` : `${e.kind === "bridge" ? "remote" : "served"}: nothing (${e.served_error})`),
          h("td", {}, e.served ? when(e.served.not_after) : "—"),
          h("td", {}, drift ? h("span", { class: "badge s-critical" }, "renewed on disk, not reloaded")
            : e.is_reloaded ? "serves its certfile" : e.kind === "bridge" ? "the bridge's remote" : "not compared")));
      }
      for (const f of e.files) {
        const dates = f.crls.length ? f.crls.map((c) => `nextUpdate ${c.next_update ? when(c.next_update) : "never"}`).join(", ")
          : f.certs.length ? when(f.certs[0].not_after) : "—";
        rows.push(h("tr", {},
          h("th", { scope: "row" }, deviceLink(host.device_id)), h("td", {}, e.name),
          h("td", { class: "mono" }, `${f.directive} ${f.path}`, h("br"), h("small", {}, f.at)),
          h("td", {}, dates), h("td", {}, badge(f.severity.toLowerCase()))));
      }
    }
  }
  fill("hosts-table", rows, "No agent runs on a broker host ([broker] in agent.toml).", 5);
}

function renderClock(c) {
  // Horizontal bars: the bin labels stay readable without rotation.
  const row = 17, left = 120, W = 420, H = c.bins.length * row + 6;
  const max = Math.max(1, ...c.bins.map((b) => b.devices));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "clock-title", class: "bars" });
  root.appendChild(svg("title", { id: "clock-title" }, "Devices by clock offset (device minus true time)"));
  c.bins.forEach((b, i) => {
    const y = 3 + i * row;
    const wdt = (b.devices / max) * (W - left - 50);
    const healthy = b.lo_s !== null && b.hi_s !== null && Math.abs(b.lo_s) <= 5 && Math.abs(b.hi_s) <= 5;
    const g = svg("g", { class: "bucket" });
    g.appendChild(svg("text", { x: left - 6, y: y + 12, class: "axis", "text-anchor": "end" }, b.label));
    g.appendChild(svg("rect", { x: left, y: y + 2, width: Math.max(wdt, b.devices ? 2 : 0), height: row - 5, class: healthy ? "r-ok" : "r-skew", "data-count": b.devices }));
    g.appendChild(svg("text", { x: left + wdt + 4, y: y + 12, class: "axis" }, String(b.devices)));
    g.appendChild(svg("title", {}, `${b.label}: ${b.devices} devices`));
    root.appendChild(g);
  });
  document.getElementById("clock-chart").replaceChildren(root);
  const worst = c.worst.filter((w) => Math.abs(w.estimate_s) >= 60).slice(0, 5);
  const hint = document.getElementById("clock-hint");
  hint.replaceChildren(`${c.no_sample} devices without an offset sample.`,
    ...(worst.length ? [" Worst: ", ...worst.flatMap((w, i) => [i ? ", " : "", deviceLink(w.device_id), ` ${seconds(w.estimate_s)}`])] : []));
}

function alertRow(a, withState) {
  return h("tr", {},
    withState ? h("td", {}, a.state) : null,
    h("td", {}, badge(a.severity === "critical" ? "critical" : a.severity === "warning" ? "warning" : "ok")),
    h("td", {}, a.rule),
    h("td", {}, deviceLink(a.device_id)),
    h("td", {}, a.summary),
    h("td", { title: when(withState ? a.updated_at : a.started_at) }, ago(withState ? a.updated_at : a.started_at)));
}

function renderAlerts(a) {
  fill("alerts-active", a.active.map((x) => alertRow(x, false)), "No active alerts.", 5);
  fill("alerts-history", a.history.slice(0, 50).map((x) => alertRow(x, true)), "No alert history.", 6);
}

async function refreshOverview() {
  const [summary, timeline, cas, brokers, clock, alerts] = await Promise.all(
    ["/api/summary", "/api/timeline?weeks=26", "/api/cas", "/api/brokers", "/api/clock", "/api/alerts?limit=50"].map(getJSON));
  renderTiles(summary);
  renderTimeline(timeline);
  renderCas(cas);
  renderBrokers(brokers);
  renderClock(clock);
  renderAlerts(alerts);
  await loadDevices();
  document.getElementById("updated").textContent = `updated ${when(summary.generated_at)}`;
}

// ---------------------------------------------------------------- device page
function table(caption, headers, rows, emptyText) {
  const body = h("tbody");
  fill(body, rows, emptyText, headers.length);
  return h("div", { class: "scroll" }, h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, ...headers.map((x) => h("th", { scope: "col" }, x)))), body));
}

async function refreshDevice(id) {
  const root = document.getElementById("device");
  let d;
  try {
    d = await getJSON(`/api/devices/${encodeURIComponent(id)}`);
  } catch (err) {
    if (String(err).includes("HTTP 404")) {
      root.replaceChildren(h("h2", {}, "Unknown device"), h("p", {}, `No device “${id}” in the store.`));
      return;
    }
    throw err;
  }
  const facts = [
    ["State", badge(d.state)],
    // Offline leads, as in the device list; the last status's worst finding follows.
    ["Worst finding", !d.online && d.status ? `DEVICE_OFFLINE (last reported: ${d.worst_code || "no findings"})` : d.worst_code || "—"],
    ["Online", d.online ? "yes" : `no (since ${when(d.online_changed_at)})`],
    ["Last seen", `${ago(d.last_seen_at)} (${when(d.last_seen_at)})`],
    ["Device clock at last status", when(d.last_status_ts)],
    ["Clock offset", offsetText(d.clock_offset_lo_s, d.clock_offset_hi_s)],
    ["Interval", d.interval_s ? `${d.interval_s} s` : "—"],
    ["Boot / seq", `${d.boot_id || "—"} / ${d.seq ?? "—"}`],
    ["First seen", when(d.first_seen_at)],
  ];
  const agent = d.status && d.status.agent;
  if (agent) facts.push(["Agent", `${agent.version}, up ${seconds(agent.uptime_s).replace(/^\+/, "")}, spool ${agent.spool_depth}`]);
  root.replaceChildren(
    h("h2", { id: "device-title" }, d.device_id, " ", badge(d.state)),
    h("dl", { class: "facts" }, ...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    table("Findings", ["Severity", "Code", "Category", "Message"], d.findings.map((f) => h("tr", {},
      h("td", {}, f.severity), h("th", { scope: "row" }, f.code), h("td", {}, f.category), h("td", {}, f.message))), "No findings."),
    table("Certificates", ["Role", "Subject", "Issuer", "Not after", "Days left", "SHA-256"], d.certificates.map((c) => h("tr", {},
      h("td", {}, c.role), h("th", { scope: "row", class: "subject" }, c.subject), h("td", { class: "subject" }, c.issuer || "—"),
      h("td", {}, when(c.not_after)), h("td", { class: c.days_left < 0 ? "num bad" : "num" }, days(c.days_left)),
      h("td", { class: "mono", title: c.sha256 }, short(c.sha256)))), "No certificates stored."),
    d.inventory ? table(`Trust store (${d.inventory.cas.length} CAs, updated ${when(d.inventory.updated_at)})`,
      ["Subject", "Not after", "SHA-256"], d.inventory.cas.map((c) => h("tr", {},
        h("th", { scope: "row", class: "subject" }, c.subject), h("td", {}, when(c.not_after)),
        h("td", { class: "mono", title: c.sha256 }, short(c.sha256)))), "Empty trust store.") : null,
    table("Alerts", ["State", "Severity", "Rule", "Summary", "Started", "Resolved"], d.alerts.map((a) => h("tr", {},
      h("td", {}, a.state), h("td", {}, a.severity), h("td", {}, a.rule), h("td", {}, a.summary),
      h("td", {}, when(a.started_at)), h("td", {}, when(a.resolved_at)))), "No alerts for this device."),
    table("History", ["When", "Change", "Detail"], d.history.map((x) => h("tr", {},
      h("td", {}, when(x.at)), h("td", {}, x.kind), h("td", { class: "mono" }, JSON.stringify(x.detail)))), "No history."),
    h("details", {}, h("summary", {}, "Full verified status (JSON)"),
      h("pre", { class: "json" }, d.status ? JSON.stringify(d.status, null, 2) : "no status yet")));
  document.getElementById("updated").textContent = `updated ${when(new Date().toISOString().slice(0, 19) + "Z")}`;
}

// ---------------------------------------------------------------- routing
function route() {
  const m = location.hash.match(/^#\/device\/(.+)$/);
  const overview = document.getElementById("overview");
  const deviceView = document.getElementById("device-view");
  overview.hidden = Boolean(m);
  deviceView.hidden = !m;
  if (m) {
    const id = decodeURIComponent(m[1]);
    document.title = `${id} — certmon`;
    return refreshDevice(id);
  }
  document.title = "certmon — fleet certificates";
  return refreshOverview();
}

// ---------------------------------------------------------------- store health
// From /api/health, which the collector answers from its own memory: it works while
// the store is down, when the other views may be stale or failing.
function renderStoreHealth(hl) {
  const box = document.getElementById("store-banner");
  const st = hl && hl.store;
  if (!st || (st.up && !st.last_outage)) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  box.hidden = false;
  if (!st.up) {
    box.className = "down";
    box.replaceChildren(h("strong", {}, "Store unavailable"),
      ` since ${when(st.since)} (${seconds(st.down_s).replace(/^\+/, "")}, ${st.error}): `,
      `${st.held} messages held unacknowledged, none lost; devices are not judged offline meanwhile. `,
      "The figures below are from before the outage.");
    return;
  }
  const o = st.last_outage;
  box.className = "recovered";
  box.replaceChildren(`Last store outage: ${when(o.started_at)} for ${seconds(o.duration_s).replace(/^\+/, "")}, `,
    `${o.messages_held} messages held, all stored (${o.error}).`);
}

function refresh() {
  getJSON("/api/health").then(renderStoreHealth).catch((err) => reportError(err && err.message ? err.message : err));
  route().catch((err) => reportError(err && err.message ? err.message : err));
}

function init() {
  document.getElementById("timeline-measure").addEventListener("change", () => {
    if (view.timeline) renderTimeline(view.timeline);
  });
  document.getElementById("f-state").addEventListener("change", () => loadDevices().catch(reportError));
  let typing = null;
  document.getElementById("f-q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => loadDevices().catch(reportError), 250);
  });
  document.getElementById("device-filter").addEventListener("submit", (ev) => ev.preventDefault());
  for (const th of document.querySelectorAll("#devices-table th[data-sort]")) {
    const key = th.dataset.sort;
    const label = th.textContent;
    const btn = h("button", { type: "button", class: "sort" }, label);
    btn.addEventListener("click", () => {
      view.sort = view.sort === key ? `-${key}` : key;
      loadDevices().catch(reportError);
    });
    th.replaceChildren(btn);
  }
  window.addEventListener("hashchange", () => { window.scrollTo(0, 0); refresh(); });
  refresh();
  view.timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", init);
