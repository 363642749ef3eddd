// The timeline: a capture's signals stacked on one time axis — one cursor across every plot, zoom and
// pan linked, the trigger instant and the pre/post windows marked on each plot, enumerations as state
// bands, a trajectory when the capture has position signals. The coordinator reduces every line to at
// most two points per plot column (min and max), so a capture of a million samples draws at once; a
// zoom asks again for the new window, so detail comes back as the window narrows.

import { ApiError, get, api, session } from "./api.js";
import { badge, clear, count, download, h, seconds, whenNs } from "./dom.js";

/* global uPlot */

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const BAND_COLORS = ["#cbd5e1", "#93c5fd", "#fca5a5", "#86efac", "#fcd34d", "#c4b5fd", "#fdba74", "#67e8f9"];
const MAX_DEFAULT_SIGNALS = 12;

export function timelinePage(main, { id, device }) {
  const state = { plots: [], detail: null, origin: 0, window: null, full: null, selected: [], traj: null };
  const expose = { plots: state.plots, timing: null };
  window.fleetloopTimeline = expose;
  const q = device ? `?device=${encodeURIComponent(device)}` : "";
  const base = `/v1/captures/${encodeURIComponent(id)}`;
  const started = performance.now();
  delete main.dataset.drawnMs; // what the previous timeline drew is not this one's
  delete main.dataset.window;

  const plotsBox = h("div", { class: "plots", id: "plots" });
  const trajBox = h("div", { class: "trajectory" });
  const status = h("div", { class: "muted", id: "timeline-status" });

  const x = (ns) => (Number(ns) - state.origin) / 1e9; // seconds from the origin
  const ns = (sec) => Math.round(state.origin + sec * 1e9);

  function markers(u) {
    const d = state.detail;
    if (d.trigger_ns === null) return;
    const ctx = u.ctx;
    const top = u.bbox.top;
    const height = u.bbox.height;
    const px = (sec) => u.valToPos(sec, "x", true);
    const t = x(d.trigger_ns);
    ctx.save();
    ctx.fillStyle = "rgba(37, 99, 235, 0.08)";
    const pre0 = px(t - d.pre_ns / 1e9);
    ctx.fillRect(pre0, top, px(t) - pre0, height);
    ctx.fillStyle = "rgba(234, 88, 12, 0.08)";
    ctx.fillRect(px(t), top, px(t + d.post_ns / 1e9) - px(t), height);
    ctx.fillStyle = "#dc2626"; // the trigger instant: a crisp line of whole device pixels
    const w = Math.max(2, Math.round(2 * devicePixelRatio));
    ctx.fillRect(Math.round(px(t)) - w / 2, top, w, height);
    ctx.restore();
  }

  function zoom(lo, hi) {
    if (!(hi > lo)) return;
    const [f0, f1] = state.full;
    state.window = [Math.max(f0, lo), Math.min(f1, hi)];
    refresh();
  }

  function baseOpts(width, height) {
    return {
      width,
      height,
      legend: { show: true, live: true },
      // the same plot area on every plot (no auto padding), so one x is one column across the stack
      padding: [8, 24, 0, 0],
      scales: { x: { time: false, auto: false } },
      axes: [{ size: 28, values: (u, ticks) => ticks.map((t) => `${t} s`) }, { size: 64 }],
      cursor: {
        sync: { key: `timeline-${id}`, setSeries: false },
        drag: { x: true, y: false, setScale: false },
        points: { size: 5 },
      },
      select: { show: true },
      hooks: {
        draw: [markers],
        setSelect: [(u) => {
          if (u.select.width < 3) return;
          const lo = u.posToVal(u.select.left, "x");
          const hi = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ width: 0, height: 0 }, false);
          zoom(lo, hi);
        }],
        setCursor: [(u) => {
          if (u.cursor.idx !== null && u.cursor.left >= 0) drawTrajectoryCursor(u.posToVal(u.cursor.left, "x"));
        }],
      },
    };
  }

  function bandsDraw(bands) {
    const values = [...new Set(bands.bands.map((b) => b.value))];
    return (u) => {
      const ctx = u.ctx;
      const top = u.bbox.top;
      const height = u.bbox.height;
      ctx.save();
      ctx.font = `${11 * devicePixelRatio}px sans-serif`;
      ctx.textBaseline = "middle";
      for (const b of bands.bands) {
        const l = Math.max(u.bbox.left, u.valToPos(x(b.from_ns), "x", true));
        const r = Math.min(u.bbox.left + u.bbox.width, u.valToPos(x(b.to_ns), "x", true));
        if (r <= l) continue;
        ctx.fillStyle = BAND_COLORS[values.indexOf(b.value) % BAND_COLORS.length];
        ctx.fillRect(l, top + 2, Math.max(1, r - l), height - 4);
        if (r - l > 24 * devicePixelRatio) {
          ctx.fillStyle = "#111827";
          ctx.fillText(b.value, l + 4, top + height / 2, r - l - 8);
        }
      }
      ctx.restore();
    };
  }

  function bandAt(bands, sec) {
    const t = ns(sec);
    const b = bands.bands.find((band) => band.from_ns <= t && t <= band.to_ns);
    return b ? b.value : "—";
  }

  function build(series) {
    for (const p of state.plots) p.destroy();
    state.plots.length = 0;
    clear(plotsBox);
    const width = Math.max(300, plotsBox.clientWidth || main.clientWidth - 40);
    const [lo, hi] = state.window;
    const units = new Map(state.detail.signals.map((s) => [s.signal, s.unit]));
    series.lines.forEach((line, i) => {
      const holder = h("div", { class: "plot", dataset: { signal: line.signal, kind: "line" } });
      plotsBox.append(holder);
      const opts = baseOpts(width, 120);
      opts.series = [{ label: "s" }, {
        label: `${line.signal}${units.get(line.signal) ? ` (${units.get(line.signal)})` : ""}`,
        stroke: COLORS[i % COLORS.length], width: 1.25, points: { show: line.t_ns.length < 400 },
      }];
      const u = new uPlot(opts, [line.t_ns.map(x), line.values], holder);
      u.setScale("x", { min: lo, max: hi });
      u.fleetloop = { signal: line.signal, samples: line.samples, reduced: line.reduced };
      holder.append(h("div", { class: "plot-note muted" }, `${count(line.samples)} samples${line.reduced ? `, drawn as ${count(line.t_ns.length)} points (min/max per column)` : ""}`));
      state.plots.push(u);
    });
    series.bands.forEach((bands) => {
      const holder = h("div", { class: "plot", dataset: { signal: bands.signal, kind: "bands" } });
      plotsBox.append(holder);
      const readout = h("span", { class: "band-value" });
      const opts = baseOpts(width, 40);
      opts.axes = [{ show: false }, { size: 64, values: () => [], ticks: { show: false }, grid: { show: false } }];
      opts.legend = { show: false };
      opts.series = [{}, { label: bands.signal, stroke: "transparent", points: { show: false } }];
      opts.scales.y = { auto: false, range: [0, 1] };
      opts.hooks.draw = [bandsDraw(bands), markers];
      opts.hooks.setCursor = [...opts.hooks.setCursor, (u) => {
        readout.textContent = u.cursor.left >= 0 ? bandAt(bands, u.posToVal(u.cursor.left, "x")) : "";
      }];
      const xs = [lo, hi];
      const u = new uPlot(opts, [xs, [0, 0]], holder);
      u.setScale("x", { min: lo, max: hi });
      u.fleetloop = { signal: bands.signal, bands: bands.bands.length };
      holder.prepend(h("div", { class: "band-label" }, bands.signal, ": ", readout, bands.truncated ? badge("more changes than shown", "warn") : null));
      state.plots.push(u);
    });
  }

  async function fetchSeries(signals, lo, hi) {
    const columns = Math.min(4000, Math.max(100, Math.round((plotsBox.clientWidth || 1000) * (window.devicePixelRatio || 1))));
    const params = new URLSearchParams({ signals: signals.join(","), columns: String(columns) });
    // the whole capture: let the coordinator take its exact bounds (a browser's numbers cannot hold
    // nanoseconds since 1970 exactly, and the first or last sample would fall outside)
    if (lo > state.full[0]) params.set("from_ns", String(ns(lo)));
    if (hi < state.full[1]) params.set("to_ns", String(ns(hi)));
    if (device) params.set("device", device);
    return get(`${base}/series?${params}`);
  }

  async function refresh() {
    const [lo, hi] = state.window;
    status.textContent = "loading…";
    try {
      const asked = performance.now();
      const series = await fetchSeries(state.selected, lo, hi);
      const received = performance.now();
      build(series);
      const from = state.detail.trigger_ns !== null ? "the trigger" : "the first sample";
      status.textContent = `window ${lo.toFixed(3)} s … ${hi.toFixed(3)} s from ${from}`;
      if (!expose.timing) {
        const now = performance.now();
        expose.timing = {
          ms: now - started, detailMs: state.detailMs, seriesMs: received - asked, drawMs: now - received,
          points: series.lines.reduce((n, l) => n + l.t_ns.length, 0),
        };
        main.dataset.drawnMs = String(Math.round(expose.timing.ms));
      }
      main.dataset.window = `${lo},${hi}`;
    } catch (err) {
      status.textContent = "";
      if (!(err instanceof ApiError && err.status === 401)) plotsBox.replaceChildren(h("div", { class: "error" }, err.message));
    }
  }

  // -- trajectory ----------------------------------------------------------------------------------
  async function trajectory() {
    const d = state.detail;
    if (d.trajectory.length !== 2) return;
    const params = new URLSearchParams({ signals: d.trajectory.join(","), columns: "4000" });
    if (device) params.set("device", device);
    const series = await get(`${base}/series?${params}`);
    const [xs, ys] = series.lines;
    const points = xs.t_ns.map((t, i) => [t, xs.values[i], nearest(ys, t)]).filter((p) => p[2] !== null);
    if (points.length < 2) return;
    const canvas = h("canvas", { width: 320 * devicePixelRatio, height: 320 * devicePixelRatio, id: "trajectory", style: "width:320px;height:320px" });
    clear(trajBox, h("h3", {}, "Trajectory"), h("div", { class: "muted" }, `${d.trajectory[1]} over ${d.trajectory[0]}`), canvas);
    state.traj = { canvas, points };
    drawTrajectoryCursor(null);
  }

  function nearest(line, t) {
    if (!line || !line.t_ns.length) return null;
    let lo = 0;
    let hi = line.t_ns.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (line.t_ns[mid] <= t) lo = mid;
      else hi = mid;
    }
    return Math.abs(line.t_ns[lo] - t) <= Math.abs(line.t_ns[hi] - t) ? line.values[lo] : line.values[hi];
  }

  function drawTrajectoryCursor(sec) {
    const tr = state.traj;
    if (!tr) return;
    const { canvas, points } = tr;
    const ctx = canvas.getContext("2d");
    const pad = 16 * devicePixelRatio;
    const xs = points.map((p) => p[1]);
    const ys = points.map((p) => p[2]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const span = Math.max(x1 - x0, y1 - y0) || 1;
    const size = canvas.width - 2 * pad;
    const px = (v) => pad + ((v - x0) / span) * size;
    const py = (v) => canvas.height - pad - ((v - y0) / span) * size;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#2563eb";
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(px(p[1]), py(p[2])) : ctx.moveTo(px(p[1]), py(p[2]))));
    ctx.stroke();
    const mark = (p, color) => {
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.arc(px(p[1]), py(p[2]), 5 * devicePixelRatio, 0, 2 * Math.PI);
      ctx.fill();
    };
    if (state.detail.trigger_ns !== null) {
      const t = Number(state.detail.trigger_ns);
      mark(points.reduce((a, b) => (Math.abs(b[0] - t) < Math.abs(a[0] - t) ? b : a)), "#dc2626");
    }
    if (sec !== null) {
      const t = ns(sec);
      mark(points.reduce((a, b) => (Math.abs(b[0] - t) < Math.abs(a[0] - t) ? b : a)), "#111827");
    }
  }

  // -- the page ------------------------------------------------------------------------------------
  async function exportAs(format) {
    const params = new URLSearchParams({ format });
    if (device) params.set("device", device);
    try {
      const response = await api("GET", `${base}/export?${params}`, { raw: true });
      const disposition = response.headers.get("Content-Disposition") || "";
      const m = /filename="([^"]+)"/.exec(disposition);
      download(m ? m[1] : `${id}.${format}`, await response.blob());
    } catch (err) {
      status.textContent = err.message;
    }
  }

  function picker() {
    const d = state.detail;
    return h("details", { class: "picker" }, h("summary", {}, `signals (${state.selected.length} of ${d.signals.length} shown)`),
      h("div", { class: "picker-list" }, d.signals.map((s) => h("label", {},
        h("input", { type: "checkbox", checked: state.selected.includes(s.signal), onchange: (e) => {
          state.selected = e.target.checked ? [...state.selected, s.signal] : state.selected.filter((v) => v !== s.signal);
          state.selected.sort();
          refresh();
        } }), ` ${s.signal} `, h("span", { class: "muted" }, `${s.kind}, ${count(s.samples)}`)))));
  }

  async function load() {
    try {
      const d = await get(`${base}${q}`);
      state.detailMs = performance.now() - started;
      state.detail = d;
      state.origin = d.trigger_ns !== null ? Number(d.trigger_ns) : Number(d.first_ns);
      state.full = [x(d.first_ns), x(d.last_ns)];
      if (state.full[1] <= state.full[0]) state.full[1] = state.full[0] + 1e-3;
      state.window = state.full.slice();
      const lines = d.signals.filter((s) => s.kind === "number").map((s) => s.signal);
      const bands = d.signals.filter((s) => s.kind !== "number").map((s) => s.signal);
      state.selected = [...bands.slice(0, 4), ...lines.slice(0, MAX_DEFAULT_SIGNALS - Math.min(4, bands.length))].sort();
      const pan = (dir) => {
        const [lo, hi] = state.window;
        const step = (hi - lo) / 2;
        const [f0, f1] = state.full;
        const shift = dir > 0 ? Math.min(step, f1 - hi) : -Math.min(step, lo - f0);
        zoom(lo + shift, hi + shift);
      };
      clear(main,
        h("h1", {}, `Capture ${d.capture_id}`),
        h("p", {}, `device `, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id),
          ` · campaign ${d.campaign} · ${count(d.samples)} samples in ${d.segments} segment(s) · `,
          d.trigger_ns !== null ? `trigger at ${whenNs(d.trigger_ns)} · pre ${seconds(d.pre_ns)} / post ${seconds(d.post_ns)} (${d.windows_from === "campaign" ? "the campaign's windows" : "as the data spans"})` : "no trigger time known"),
        d.state === "arriving" ? h("div", { class: "warn-box", id: "arriving" }, "This capture is still arriving: more segments may come, and the plots show what is here now.") : null,
        h("div", { class: "toolbar" },
          h("button", { onclick: () => pan(-1), title: "pan left" }, "◀"),
          h("button", { onclick: () => pan(1), title: "pan right" }, "▶"),
          h("button", { onclick: () => zoom(...state.full), id: "zoom-reset" }, "Whole capture"),
          h("span", { class: "muted" }, "drag across a plot to zoom"),
          h("span", { class: "spacer" }),
          "Export: ",
          ["mcap", "parquet", "csv"].map((f) => h("button", { onclick: () => exportAs(f), id: `export-${f}`, title: { mcap: "for Foxglove", parquet: "for notebooks and Spark", csv: "for PlotJuggler and spreadsheets" }[f] }, f.toUpperCase()))),
        picker(),
        status,
        h("div", { class: "timeline" }, plotsBox, trajBox));
      if (!d.signals.length) {
        plotsBox.append(h("p", { class: "empty" }, "This capture has no samples in the fleet store yet."));
        return;
      }
      await refresh();
      await trajectory();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) clear(main, h("h1", {}, `Capture ${id}`), h("div", { class: "error", role: "alert" }, err.message));
    }
  }
  load();
  const onResize = () => state.plots.forEach((u) => u.setSize({ width: Math.max(300, plotsBox.clientWidth), height: u.height }));
  window.addEventListener("resize", onResize);
  return {
    onEvent() {},
    dispose() {
      window.removeEventListener("resize", onResize);
      for (const p of state.plots) p.destroy();
      delete main.dataset.drawnMs;
      delete main.dataset.window;
      if (window.fleetloopTimeline === expose) delete window.fleetloopTimeline;
    },
  };
}
