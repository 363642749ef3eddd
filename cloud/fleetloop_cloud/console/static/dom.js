// Building the page: elements from data (text is always set as text, never parsed as HTML, so nothing a
// device or an operator wrote can run as code), and the formats every page shares.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export function table(columns, rows, { empty = "nothing to show", rowAttrs } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    { class: "grid" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.title)))),
    h(
      "tbody",
      {},
      rows.map((row) =>
        h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((c) => h("td", { class: c.class || "" }, c.cell(row)))),
      ),
    ),
  );
}

export function bytes(n) {
  if (n === undefined || n === null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function count(n) {
  return n === undefined || n === null ? "—" : Number(n).toLocaleString("en-US");
}

export function when(unixSeconds) {
  if (!unixSeconds) return "—";
  return new Date(unixSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function whenNs(ns) {
  if (ns === undefined || ns === null) return "—";
  const ms = Number(ns) / 1e6;
  return new Date(ms).toISOString().replace("T", " ").replace("Z", "");
}

export function ago(unixSeconds, now = Date.now() / 1000) {
  if (!unixSeconds) return "never";
  const s = Math.max(0, Math.round(now - unixSeconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function seconds(ns) {
  return `${(Number(ns) / 1e9).toFixed(Number(ns) % 1e9 ? 1 : 0)} s`;
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

export function stateBadge(state) {
  const kind = {
    online: "ok", complete: "ok", committed: "ok", COMMITTED: "ok", finished: "ok", FINISHED: "ok",
    offline: "off", arriving: "warn", paused: "warn", PAUSED: "warn", running: "info", RUNNING: "info",
    failed: "bad", FAILED: "bad", aborted: "bad", ABORTED: "bad", ROLLED_BACK: "bad",
  }[state] || "";
  return badge(state, kind);
}

// Any JSON value as elements: objects as key/value lists, arrays of objects as tables. Fields a page
// does not know yet (a newer coordinator's) still show.
export function generic(value, depth = 0) {
  if (value === null || value === undefined) return h("span", { class: "muted" }, "—");
  if (Array.isArray(value)) {
    if (!value.length) return h("span", { class: "muted" }, "none");
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
      return table(keys.map((k) => ({ title: k, cell: (row) => generic(row[k], depth + 1) })), value);
    }
    return h("span", {}, value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", "));
  }
  if (typeof value === "object") {
    if (depth > 3) return h("code", {}, JSON.stringify(value));
    return h("dl", { class: "kv" }, Object.entries(value).map(([k, v]) => [h("dt", {}, k), h("dd", {}, generic(v, depth + 1))]));
  }
  if (typeof value === "boolean") return badge(value ? "yes" : "no", value ? "ok" : "off");
  return String(value);
}

export function download(filename, blob) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, class: "hidden" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export function csvOf(columns, rows) {
  const cell = (v) => {
    if (v === null || v === undefined) return "";
    const s = typeof v === "object" ? JSON.stringify(v) : String(v);
    return /[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
  };
  return [columns.map(cell).join(","), ...rows.map((r) => r.map(cell).join(","))].join("\n") + "\n";
}
