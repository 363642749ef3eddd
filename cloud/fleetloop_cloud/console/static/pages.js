// The console's pages. Each is `render(main, params)` → an object with `onEvent(event)` (the feed's
// events it cares about) and optionally `dispose()`. Write buttons appear only where the session's role
// allows the action: what each role may do is what the page offers.

import { ApiError, can, get, post, api, session } from "./api.js";
import {
  ago, badge, bytes, clear, count, csvOf, download, generic, h, seconds, stateBadge, table, when, whenNs,
} from "./dom.js";

function failure(err) {
  const text = err instanceof ApiError ? `${err.message}${err.requestId ? ` (request ${err.requestId})` : ""}` : String(err);
  return h("div", { class: "error", role: "alert" }, text);
}

async function guarded(main, work) {
  try {
    await work();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    main.append(failure(err));
  }
}

function writeButton(action, label, onclick, extra = {}) {
  if (!can(action)) return null;
  return h("button", { class: `write ${extra.class || ""}`, dataset: { action }, onclick, ...extra.attrs }, label);
}

// -- fleet ------------------------------------------------------------------------------------------
function labelMatch(filter, device) {
  const terms = filter.split(",").map((t) => t.trim()).filter(Boolean);
  const labels = { fleet: device.fleet, hardware_id: device.hardware_id, ...device.labels };
  return terms.every((term) => {
    const [k, v] = term.split("=").map((s) => s.trim());
    return v === undefined ? k in labels || device.device_id.includes(k) : labels[k] === v;
  });
}

function telemetry(device, key) {
  return (device.telemetry || {})[key];
}

function storageFill(device) {
  const used = telemetry(device, "store_bytes");
  const quota = telemetry(device, "store_quota_bytes");
  if (!quota) return "—";
  const pct = Math.min(100, (100 * used) / quota);
  return h("span", { class: "fill", title: `${bytes(used)} of ${bytes(quota)}` },
    h("span", { class: "fill-bar" }, h("span", { style: `width:${pct.toFixed(0)}%` })), `${pct.toFixed(0)} %`);
}

function clockOffset(device) {
  const ms = telemetry(device, "clock_offset_ms");
  if (ms === undefined || ms === null) return "—";
  return `${ms > 0 ? "+" : ""}${Number(ms).toFixed(0)} ms`;
}

export function fleetPage(main) {
  const devices = new Map();
  let summary = null;
  let filter = sessionStorage.getItem("fleetloop.filter") || "";
  const cards = h("div", { class: "cards" });
  const body = h("div", { id: "fleet-table" });
  const input = h("input", {
    type: "search", placeholder: "filter by label: kind=car,fleet=demo", value: filter, id: "label-filter",
    oninput: (e) => {
      filter = e.target.value;
      sessionStorage.setItem("fleetloop.filter", filter);
      draw();
    },
  });
  clear(main, h("h1", {}, "Fleet"), cards, h("div", { class: "toolbar" }, input), body);

  function drawCards() {
    if (!summary) return;
    const card = (label, value) => h("div", { class: "card" }, h("div", { class: "value" }, value), h("div", {}, label));
    clear(cards,
      card("devices", count(summary.devices)),
      h("div", { class: "card", id: "online-count" }, h("div", { class: "value" }, count(summary.online)), h("div", {}, "online")),
      card("captures", count(summary.captures_ingested)),
      card("samples", count(summary.samples_ingested)),
      card("campaigns", count(summary.campaigns)));
  }

  function draw() {
    const rows = [...devices.values()].filter((d) => labelMatch(filter, d)).sort((a, b) => a.device_id.localeCompare(b.device_id));
    clear(body, table([
      { title: "device", cell: (d) => h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id) },
      { title: "state", cell: (d) => stateBadge(d.online ? "online" : "offline") },
      { title: "kind", cell: (d) => d.labels.kind || "—" },
      { title: "fleet", cell: (d) => d.fleet },
      { title: "firmware", cell: (d) => d.firmware_version || "—" },
      { title: "agent", cell: (d) => d.agent_version || "—" },
      { title: "campaigns", cell: (d) => `v${d.campaigns_version} · ${d.campaigns_running.length} running` },
      { title: "storage", cell: storageFill },
      { title: "upload backlog", cell: (d) => (telemetry(d, "bytes_pending") === undefined ? "—"
        : `${bytes(telemetry(d, "bytes_pending"))} · ${count(telemetry(d, "segments_pending"))} seg`) },
      { title: "last seen", cell: (d) => h("span", { class: "ago", dataset: { t: d.last_seen } }, ago(d.last_seen)) },
      { title: "clock offset", cell: clockOffset },
    ], rows, {
      empty: devices.size ? "no device matches this filter" : "no device has connected yet",
      rowAttrs: (d) => ({ dataset: { device: d.device_id, online: String(d.online) } }),
    }));
  }

  const tick = setInterval(() => {
    for (const el of body.querySelectorAll(".ago")) el.textContent = ago(Number(el.dataset.t));
  }, 1000);

  async function load() {
    await guarded(main, async () => {
      const [list, sum] = await Promise.all([get("/v1/devices"), get("/v1/summary")]);
      devices.clear();
      for (const d of list) devices.set(d.device_id, d);
      summary = sum;
      drawCards();
      draw();
    });
  }
  load();
  return {
    onEvent(event) {
      if (event.type === "device") {
        devices.set(event.device.device_id, event.device);
        draw();
      } else if (event.type === "device_removed") {
        devices.delete(event.device_id);
        draw();
      } else if (event.type === "summary") {
        summary = event.summary;
        drawCards();
      } else if (event.type === "ready" || event.type === "resync") load();
    },
    dispose: () => clearInterval(tick),
  };
}

// -- device -----------------------------------------------------------------------------------------
export function devicePage(main, { id }) {
  async function load() {
    await guarded(main, async () => {
      const [device, campaigns, ota, captures] = await Promise.all([
        get(`/v1/devices/${encodeURIComponent(id)}`),
        get(`/v1/devices/${encodeURIComponent(id)}/campaigns`),
        get(`/v1/devices/${encodeURIComponent(id)}/ota`),
        get(`/v1/captures?device=${encodeURIComponent(id)}&limit=20`),
      ]);
      const names = [...new Set([...campaigns.desired.map((c) => c.name), ...campaigns.running, ...Object.keys(campaigns.refused)])].sort();
      const desired = new Map(campaigns.desired.map((c) => [c.name, c.version]));
      clear(main,
        h("h1", {}, device.device_id, " ", stateBadge(device.online ? "online" : "offline")),
        h("dl", { class: "kv wide" },
          [["fleet", device.fleet], ["labels", Object.entries(device.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "—"],
            ["hardware", device.hardware_id || "—"], ["firmware", `${device.firmware_version || "—"} (slot ${device.active_slot || "—"})`],
            ["agent", device.agent_version || "—"], ["data", device.data_origin || "—"],
            ["last seen", `${when(device.last_seen)} (${ago(device.last_seen)})`], ["registered", when(device.registered_at)]]
            .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
        h("h2", {}, "Campaigns: desired v", campaigns.desired_version, " · reported v", campaigns.reported_version,
          campaigns.desired_version === campaigns.reported_version ? badge("in sync", "ok") : badge("converging", "warn")),
        table([
          { title: "campaign", cell: (n) => n },
          { title: "desired", cell: (n) => (desired.has(n) ? `revision ${desired.get(n)}` : "not desired") },
          { title: "reported", cell: (n) => (campaigns.running.includes(n) ? stateBadge("running")
            : campaigns.refused[n] ? badge("refused", "bad") : badge("not running", "off")) },
          { title: "reason", cell: (n) => campaigns.refused[n] || "" },
        ], names, { empty: "no campaign targets this device" }),
        h("h2", {}, "OTA history"),
        table([
          { title: "rollout", cell: (r) => h("a", { href: `#/rollouts/${encodeURIComponent(r.rollout_id)}` }, r.rollout_id) },
          { title: "release", cell: (r) => r.release_version },
          { title: "phase", cell: (r) => r.phase },
          { title: "state", cell: (r) => stateBadge(r.state) },
          { title: "reason", cell: (r) => r.reason || "" },
          { title: "transitions", cell: (r) => h("ol", { class: "events" }, r.events.map((e) => h("li", {}, `${when(e.at)} ${e.detail}`))) },
        ], ota, { empty: "this device has been in no rollout" }),
        h("h2", {}, "Recent captures"),
        capturesTable(captures.slice().reverse(), "this device has sent no captures yet"),
      );
    });
  }
  load();
  return { onEvent(event) { if ((event.type === "device" && event.device.device_id === id) || event.type === "captures" || event.type === "ready") load(); } };
}

function capturesTable(captures, empty) {
  return table([
    { title: "capture", cell: (c) => h("a", { href: `#/captures/${encodeURIComponent(c.capture_id)}?device=${encodeURIComponent(c.device_id)}`, class: "capture-link" }, c.capture_id) },
    { title: "device", cell: (c) => c.device_id },
    { title: "campaign", cell: (c) => c.campaign },
    { title: "data from", cell: (c) => whenNs(c.first_ns) },
    { title: "span", cell: (c) => seconds(c.last_ns - c.first_ns) },
    { title: "samples", cell: (c) => count(c.samples), class: "num" },
    { title: "state", cell: (c) => stateBadge(c.state) },
  ], captures, { empty });
}

// -- campaigns --------------------------------------------------------------------------------------
const TEMPLATE = `apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: my-campaign, version: 1}
spec:
  target: {selector: "kind=car"}
  trigger:
    when: "Vehicle.Speed > 30 and delta(Vehicle.Speed, 1s) < -5"
  collect:
    signals: [Vehicle.Speed, Vehicle.Chassis.*]
    pre: 5s
    post: 2s
  priority: 5
`;

const LOCATION = /^(.*?):(\d+):(\d+): (.*)$/;

function editor(initial, readOnly) {
  const gutter = h("div", { class: "gutter", "aria-hidden": "true" });
  const area = h("textarea", { class: "code", spellcheck: "false", id: "campaign-text", readonly: readOnly || undefined });
  area.value = initial;
  const marker = h("div", { class: "error-marker hidden", id: "error-marker", role: "alert" });
  const box = h("div", { class: "editor" }, gutter, h("div", { class: "code-wrap" }, area, marker));
  let errorLine = 0;
  function lines() {
    const n = area.value.split("\n").length;
    clear(gutter, Array.from({ length: n }, (_, i) => h("div", { class: i + 1 === errorLine ? "ln error-line" : "ln", dataset: { line: i + 1 } }, i + 1)));
    gutter.scrollTop = area.scrollTop;
    placeMarker();
  }
  function placeMarker() {
    if (!errorLine) return;
    const lh = parseFloat(getComputedStyle(area).lineHeight) || 18;
    marker.style.top = `${(errorLine) * lh - area.scrollTop + 6}px`;
  }
  area.addEventListener("input", () => {
    showError(null);
    lines();
  });
  area.addEventListener("scroll", () => {
    gutter.scrollTop = area.scrollTop;
    placeMarker();
  });
  function showError(err) {
    const m = err && LOCATION.exec(err);
    errorLine = m ? Number(m[2]) : 0;
    if (!err) marker.classList.add("hidden");
    else {
      marker.classList.remove("hidden");
      marker.textContent = err;
      marker.dataset.line = m ? m[2] : "";
      marker.dataset.col = m ? m[3] : "";
      if (m) marker.style.left = `${Math.min(Number(m[3]), 80)}ch`;
    }
    lines();
  }
  lines();
  return { box, area, showError };
}

export function campaignsPage(main, { name }) {
  let docs = [];
  let stats = new Map();
  const list = h("div", { id: "campaign-list" });
  const side = h("div", { class: "panel" });
  clear(main, h("h1", {}, "Campaigns"), h("div", { class: "split" }, list, side));

  function open(doc) {
    const isNew = !doc;
    const ed = editor(doc ? doc.document : TEMPLATE, !can("campaigns.apply"));
    const source = `${doc ? doc.name : "new-campaign"}.yaml`;
    const result = h("div", { class: "result", id: "campaign-result" });
    async function send(path) {
      ed.showError(null);
      clear(result);
      try {
        const out = await post(`${path}?source=${encodeURIComponent(source)}`, ed.area.value, "text/yaml");
        clear(result, h("div", { class: "ok-box" }, path.endsWith("validate")
          ? `valid: ${out.name} v${out.version}, selector "${out.selector}" matches ${out.devices.length} device(s)`
          : `applied ${out.name}: campaigns v${out.campaigns_version}, ${out.devices.length} device(s) match`));
        if (!path.endsWith("validate")) load();
      } catch (err) {
        if (err instanceof ApiError && err.type === "RuleError") ed.showError(err.message);
        else clear(result, failure(err));
      }
    }
    const del = doc && writeButton("campaigns.delete", "Delete", async () => {
      if (!confirm(`Delete campaign ${doc.name}? Devices stop running it.`)) return;
      try {
        await api("DELETE", `/v1/campaigns/${encodeURIComponent(doc.name)}`);
        load();
        clear(side);
      } catch (err) {
        clear(result, failure(err));
      }
    }, { class: "danger" });
    clear(side,
      h("h2", {}, isNew ? "New campaign" : `${doc.name} · revision ${doc.version}`),
      ed.box,
      h("div", { class: "toolbar" },
        can("campaigns.validate") ? h("button", { onclick: () => send("/v1/campaigns/validate"), id: "validate" }, "Validate") : null,
        writeButton("campaigns.apply", "Save and apply", () => send("/v1/campaigns"), { attrs: { id: "apply" } }),
        del),
      result);
  }

  function draw() {
    clear(list,
      writeButton("campaigns.apply", "New campaign", () => open(null), { attrs: { id: "new-campaign" } }),
      table([
        { title: "campaign", cell: (d) => h("a", { href: `#/campaigns/${encodeURIComponent(d.name)}` }, d.name) },
        { title: "revision", cell: (d) => d.version, class: "num" },
        { title: "captures / h", cell: (d) => count((stats.get(d.name) || {}).last_hour || 0), class: "num" },
        { title: "last 24 h", cell: (d) => spark((stats.get(d.name) || {}).hours || []) },
        { title: "total", cell: (d) => count((stats.get(d.name) || {}).total || 0), class: "num" },
      ], docs, { empty: "no campaign is applied" }));
    const selected = docs.find((d) => d.name === name);
    if (selected) open(selected);
  }

  async function load() {
    await guarded(main, async () => {
      const out = await get("/v1/campaigns");
      docs = out.campaigns;
      stats = await captureRates();
      draw();
    });
  }
  load();
  return { onEvent(event) { if (["campaigns", "captures", "ready"].includes(event.type)) load(); } };
}

async function captureRates() {
  const sql = `SELECT campaign, CAST(floor((epoch(now()) - first_received) / 3600) AS INTEGER) AS hours_ago,
    count(*) AS n FROM captures GROUP BY ALL`;
  const out = new Map();
  try {
    const result = await post("/v1/query", { sql, max_rows: 100000, timeout_s: 10 });
    for (const [campaign, hoursAgo, n] of result.rows) {
      const s = out.get(campaign) || { total: 0, last_hour: 0, hours: new Array(24).fill(0) };
      s.total += n;
      if (hoursAgo < 1) s.last_hour += n;
      if (hoursAgo < 24) s.hours[23 - hoursAgo] += n;
      out.set(campaign, s);
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) throw err;
  }
  return out;
}

function spark(values) {
  const top = Math.max(1, ...values);
  return h("span", { class: "spark", title: "captures per hour, last 24 h" },
    values.map((v) => h("span", { style: `height:${Math.round((100 * v) / top)}%` })));
}

// -- rollouts ---------------------------------------------------------------------------------------
const KNOWN_ROLLOUT_FIELDS = new Set(["id", "release_version", "state", "phase", "phase_name", "phase_started_at",
  "phases", "devices", "reason", "counts", "accepted_failures", "created_at", "updated_at", "policy"]);

export function rolloutsPage(main, { id }) {
  async function loadList() {
    await guarded(main, async () => {
      const list = await get("/v1/rollouts");
      clear(main, h("h1", {}, "Rollouts"), table([
        { title: "rollout", cell: (r) => h("a", { href: `#/rollouts/${encodeURIComponent(r.id)}` }, r.id) },
        { title: "release", cell: (r) => r.release_version },
        { title: "state", cell: (r) => stateBadge(r.state) },
        { title: "phase", cell: (r) => r.phase },
        { title: "devices", cell: (r) => r.devices, class: "num" },
        { title: "by state", cell: (r) => Object.entries(r.counts).filter(([, n]) => n).map(([s, n]) => `${s} ${n}`).join(" · ") },
        { title: "reason", cell: (r) => r.reason || "" },
        { title: "updated", cell: (r) => when(r.updated_at) },
      ], list.slice().reverse(), { empty: "no rollout yet" }));
    });
  }

  async function loadOne() {
    await guarded(main, async () => {
      const path = `/v1/rollouts/${encodeURIComponent(id)}`;
      const [r, history, audit] = await Promise.all([
        get(path), get(`${path}/history`), get(`/v1/audit?kind=rollouts&limit=10000`),
      ]);
      const feedback = h("div", { id: "rollout-result" });
      // every verb the coordinator offers, but undo: it needs a revision (`fleetloop rollout undo`)
      const verbs = [...session.rolloutVerbs.entries()].filter(([verb]) => verb !== "undo");
      const buttons = verbs.map(([verb, action]) =>
        writeButton(action, verb.replace("-", " "), async () => {
          if (["abort", "rollback"].includes(verb) && !confirm(`${verb} rollout ${id}?`)) return;
          try {
            await post(`${path}/${verb}`, {});
            loadOne();
          } catch (err) {
            clear(feedback, failure(err));
          }
        }, { class: ["abort", "rollback"].includes(verb) ? "danger" : "", attrs: { id: `rollout-${verb}` } }));
      const extra = Object.fromEntries(Object.entries(r).filter(([k]) => !KNOWN_ROLLOUT_FIELDS.has(k)));
      const trail = audit.filter((e) => e.target === id);
      clear(main,
        h("h1", {}, `Rollout ${r.id} `, h("span", { id: "rollout-state" }, stateBadge(r.state))),
        h("p", {}, `release ${r.release_version} · phase ${r.phase} (${r.phase_name || "—"}) since ${when(r.phase_started_at)}`,
          r.reason ? ` · ${r.reason}` : ""),
        h("div", { class: "toolbar" }, buttons),
        feedback,
        h("h2", {}, "Phases"),
        h("div", { class: "phases" }, r.phases.map((p, i) => h("div", { class: `phase ${i === r.phase ? "current" : ""}` },
          h("h3", {}, `${i}. ${p.name}`),
          h("div", {}, `${p.committed}/${p.devices} committed · ${p.failed} failed`),
          h("ul", { class: "device-states" }, r.devices.filter((d) => d.phase === i).map((d) =>
            h("li", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id), " ", stateBadge(d.state),
              d.reason ? h("span", { class: "muted" }, ` ${d.reason}`) : null)))))),
        Object.keys(extra).length ? [h("h2", {}, "Gates and decisions"), h("div", { id: "rollout-extra" }, generic(extra))] : null,
        h("h2", {}, "Policy"), generic(r.policy),
        h("h2", {}, "Audit trail"),
        table([
          { title: "when", cell: (e) => when(e.at) },
          { title: "who", cell: (e) => `${e.actor} (${e.role})` },
          { title: "action", cell: (e) => e.action },
          { title: "change", cell: (e) => (e.before || e.after ? `${e.before} → ${e.after}` : "") },
          { title: "detail", cell: (e) => e.detail },
        ], trail, { empty: "no operator action yet" }),
        h("h3", {}, "Signal-gate evaluations"),
        table([
          { title: "when", cell: (g) => when(g.at) },
          { title: "gate", cell: (g) => g.gate },
          { title: "phase", cell: (g) => String(g.phase) },
          { title: "decision", cell: (g) => stateBadge(g.decision) },
          { title: "effect", cell: (g) => (g.effect === null || g.effect === undefined ? "—" : g.effect.toFixed(3)) },
          { title: "p", cell: (g) => (g.p_value === null || g.p_value === undefined ? "—" : g.p_value.toPrecision(2)) },
          { title: "reason", cell: (g) => g.reason },
        ], history.gate_evaluations.slice().reverse(), { empty: "no gate evaluated yet" }),
        h("h3", {}, "Controller events"),
        table([
          { title: "when", cell: (e) => when(e.at) },
          { title: "event", cell: (e) => e.event },
          { title: "detail", cell: (e) => e.detail },
        ], history.events.slice().reverse(), { empty: "no event yet" }),
      );
    });
  }
  if (id) loadOne();
  else loadList();
  return {
    onEvent(event) {
      if (event.type === "ready" || (event.type === "rollout" && (!id || event.rollout.id === id))
          || (event.type === "audit" && id && event.entry.target === id)) {
        if (id) loadOne();
        else loadList();
      }
    },
  };
}

// -- captures ---------------------------------------------------------------------------------------
export function capturesPage(main) {
  const form = { device: "", campaign: "", from: "", until: "" };
  const body = h("div", { id: "captures-table" });
  const deviceSel = h("select", { id: "capture-device", onchange: (e) => { form.device = e.target.value; load(); } });
  const campaignSel = h("select", { id: "capture-campaign", onchange: (e) => { form.campaign = e.target.value; load(); } });
  const from = h("input", { type: "datetime-local", onchange: (e) => { form.from = e.target.value; load(); } });
  const until = h("input", { type: "datetime-local", onchange: (e) => { form.until = e.target.value; load(); } });
  clear(main, h("h1", {}, "Captures"),
    h("div", { class: "toolbar" }, h("label", {}, "device ", deviceSel), h("label", {}, "campaign ", campaignSel),
      h("label", {}, "data from ", from), h("label", {}, "until ", until)),
    body);

  function options(sel, values, current) {
    clear(sel, h("option", { value: "" }, "any"), values.map((v) => h("option", { value: v, selected: v === current }, v)));
  }
  const ns = (local) => (local ? String(BigInt(Date.parse(`${local}Z`)) * 1000000n) : "");

  async function load() {
    await guarded(main, async () => {
      const all = await get("/v1/captures?limit=10000");
      options(deviceSel, [...new Set(all.map((c) => c.device_id))].sort(), form.device);
      options(campaignSel, [...new Set(all.map((c) => c.campaign))].sort(), form.campaign);
      const q = new URLSearchParams({ limit: "500" });
      if (form.device) q.set("device", form.device);
      if (form.campaign) q.set("campaign", form.campaign);
      if (form.from) q.set("since_ns", ns(form.from));
      if (form.until) q.set("until_ns", ns(form.until));
      const shown = await get(`/v1/captures?${q}`);
      clear(body, capturesTable(shown.reverse(), all.length ? "no capture matches" : "no capture has arrived yet"));
    });
  }
  load();
  return { onEvent(event) { if (event.type === "captures" || event.type === "ready") load(); } };
}

// -- query ------------------------------------------------------------------------------------------
export function queryPage(main) {
  const area = h("textarea", { class: "code sql", id: "sql", spellcheck: "false" });
  area.value = sessionStorage.getItem("fleetloop.sql") ||
    "SELECT device_id, campaign, count(DISTINCT capture_id) AS captures, count(*) AS samples\nFROM samples GROUP BY ALL ORDER BY 1, 2";
  const maxRows = h("input", { type: "number", min: 1, max: 100000, value: 1000, id: "max-rows" });
  const timeout = h("input", { type: "number", min: 1, max: 120, value: 30, id: "timeout" });
  const out = h("div", { id: "query-result" });
  let last = null;
  async function run() {
    sessionStorage.setItem("fleetloop.sql", area.value);
    clear(out, h("p", { class: "muted" }, "running…"));
    const started = performance.now();
    try {
      last = await post("/v1/query", { sql: area.value, max_rows: Number(maxRows.value), timeout_s: Number(timeout.value) });
      const ms = performance.now() - started;
      clear(out,
        h("p", {}, `${count(last.rows.length)} row(s) in ${ms.toFixed(0)} ms`, last.truncated ? badge(`truncated at ${maxRows.value}`, "warn") : null,
          " ", h("button", { id: "csv", onclick: () => download("query.csv", new Blob([csvOf(last.columns, last.rows)], { type: "text/csv" })) }, "Download CSV")),
        table(last.columns.map((c, i) => ({ title: c, cell: (row) => (row[i] === null ? h("span", { class: "muted" }, "NULL") : typeof row[i] === "object" ? JSON.stringify(row[i]) : String(row[i])) })),
          last.rows, { empty: "the query returned no rows" }));
    } catch (err) {
      clear(out, failure(err));
    }
  }
  clear(main, h("h1", {}, "Query"),
    h("p", { class: "muted" }, "One SELECT over samples and captures (docs/query.md); your role's limits apply."),
    area,
    h("div", { class: "toolbar" }, h("button", { onclick: run, id: "run-query" }, "Run"),
      h("label", {}, "max rows ", maxRows), h("label", {}, "time limit (s) ", timeout)),
    out);
  return { onEvent() {} };
}
