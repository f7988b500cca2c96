// tokvel dashboard: the REST API for the ranking and the charts, the WebSocket for live updates.
// Plain DOM and SVG, no framework, nothing from another origin (the page's CSP forbids it).
"use strict";

(function () {
  const KEY_STORAGE = "tokvel.apiKey";
  const PAGE_SIZE = 50;
  const SORT_FIELDS = { market_cap: "market_cap_usd", velocity: "velocity", velocity_7d: "velocity_7d" };
  const WINDOWS = ["1h", "4h", "12h", "24h", "7d"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_RETRY_SECONDS = 30;

  const state = {
    key: "",
    wsUrl: "",
    sort: "market_cap",
    order: "desc",
    rows: new Map(), // cmc_id -> row (the REST summary, updated by live samples)
    asOf: null, // newest event time shown (ms)
    clockOffset: 0, // server clock - browser clock (ms), from meta.age_s
    ws: null,
    subscribed: new Set(),
    seqs: {}, // cmc_id -> last seq, for resuming after a reconnect
    retries: 0,
    retryTimer: null,
    selected: null,
    history: [],
    generation: 0, // bumped by every start(): stale answers and sockets are ignored
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------------------ formatting

  const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 2 });

  function num(value) {
    return value === null || value === undefined ? null : Number(value);
  }

  function money(value) {
    const v = num(value);
    if (v === null || Number.isNaN(v)) return "–";
    if (Math.abs(v) >= 1e5) return "$" + compact.format(v);
    if (Math.abs(v) >= 1) return "$" + v.toFixed(2);
    return "$" + v.toPrecision(4);
  }

  function ratio(value, digits) {
    const v = num(value);
    return v === null || Number.isNaN(v) ? "–" : v.toFixed(digits);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    if (s < 86400) return Math.floor(s / 3600) + "h";
    if (s < 86400 * 365) return Math.floor(s / 86400) + "d";
    return (s / (86400 * 365.25)).toFixed(1) + "y";
  }

  function utc(ms) {
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  }

  function say(text) {
    $("message").textContent = text;
  }

  function wsStatus(text, stateName) {
    const el = $("ws-status");
    el.textContent = text;
    el.dataset.state = stateName;
  }

  // ------------------------------------------------------------------------------ REST

  async function api(path) {
    const response = await fetch(path, { headers: { "X-API-Key": state.key, Accept: "application/json" } });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      const retry = response.headers.get("Retry-After");
      throw new Error(response.status + ": " + message + (retry ? " (retry in " + retry + "s)" : ""));
    }
    return body;
  }

  function noteAsOf(asOf, ageSeconds) {
    if (!asOf) return;
    const t = Date.parse(asOf);
    if (ageSeconds !== null && ageSeconds !== undefined) {
      state.clockOffset = t + ageSeconds * 1000 - Date.now();
    }
    if (state.asOf === null || t > state.asOf) state.asOf = t;
  }

  async function loadTokens() {
    const generation = state.generation;
    const query = new URLSearchParams({ sort: state.sort, order: state.order, limit: String(PAGE_SIZE) });
    const body = await api("/v1/tokens?" + query.toString());
    if (generation !== state.generation) return;
    const now = Date.now();
    state.rows = new Map(body.data.map((t) => [t.cmc_id, Object.assign({ receivedAt: now }, t)]));
    noteAsOf(body.meta.as_of, body.meta.age_s);
    renderTable();
    syncSubscriptions();
    if (state.selected === null || !state.rows.has(state.selected)) {
      const first = sortedRows()[0];
      if (first) select(first.cmc_id);
    }
  }

  // ------------------------------------------------------------------------------ table

  function compare(a, b) {
    const field = SORT_FIELDS[state.sort];
    const x = num(a[field]);
    const y = num(b[field]);
    if (x === null && y !== null) return 1; // nulls last, whatever the order
    if (y === null && x !== null) return -1;
    if (x !== y) return state.order === "desc" ? y - x : x - y;
    return a.cmc_id - b.cmc_id;
  }

  function sortedRows() {
    return Array.from(state.rows.values()).sort(compare);
  }

  function cell(tr, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    tr.appendChild(td);
    return td;
  }

  function rowElement(row) {
    const tr = document.createElement("tr");
    tr.dataset.cmcId = String(row.cmc_id);
    tr.dataset.ts = row.ts;
    tr.tabIndex = 0;
    if (row.cmc_id === state.selected) tr.classList.add("selected");
    cell(tr, row.cmc_rank === null ? "–" : String(row.cmc_rank), "rank");
    const name = cell(tr, row.symbol || "?", "token");
    const full = document.createElement("span");
    full.className = "muted";
    full.textContent = " " + (row.name || "");
    name.appendChild(full);
    cell(tr, money(row.price_usd), "num price");
    cell(tr, money(row.market_cap_usd), "num market-cap");
    cell(tr, money(row.volume_24h_usd), "num volume");
    cell(tr, ratio(row.velocity, 4), "num velocity");
    cell(tr, ratio(row.velocity_7d, 4), "num velocity-7d");
    const trend = cell(tr, row.trend.replace("_", " "), "trend");
    trend.dataset.trend = row.trend;
    cell(tr, ratio(row.data_quality_score, 2), "num quality");
    cell(tr, utc(Date.parse(row.ts)), "ts");
    const updated = cell(tr, "", "updated");
    updated.dataset.receivedAt = String(row.receivedAt);
    updated.title = "time since this browser received the row";
    return tr;
  }

  function renderTable(flashId) {
    const tbody = document.querySelector("#tokens tbody");
    const fragment = document.createDocumentFragment();
    for (const row of sortedRows()) {
      const tr = rowElement(row);
      if (row.cmc_id === flashId) tr.classList.add("flash");
      fragment.appendChild(tr);
    }
    tbody.replaceChildren(fragment);
    for (const th of document.querySelectorAll("th.sortable")) {
      const active = th.dataset.sort === state.sort;
      th.dataset.order = active ? state.order : "";
      th.setAttribute("aria-sort", active ? (state.order === "desc" ? "descending" : "ascending") : "none");
    }
    tick();
  }

  function tick() {
    const now = Date.now();
    for (const td of document.querySelectorAll("#tokens td.updated")) {
      td.textContent = duration((now - Number(td.dataset.receivedAt)) / 1000) + " ago";
    }
    if (state.asOf !== null) {
      $("as-of").textContent = utc(state.asOf) + " UTC";
      $("age").textContent = "age " + duration((now + state.clockOffset - state.asOf) / 1000);
    }
  }

  function sortBy(field) {
    if (state.sort === field) {
      state.order = state.order === "desc" ? "asc" : "desc";
    } else {
      state.sort = field;
      state.order = "desc";
    }
    renderTable(); // at once, then the server's page for the new order
    loadTokens().catch((err) => say("Could not load tokens: " + err.message));
  }

  // ------------------------------------------------------------------------------ live updates

  function send(message) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
  }

  function syncSubscriptions() {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    const wanted = new Set(state.rows.keys());
    const added = [...wanted].filter((id) => !state.subscribed.has(id));
    const removed = [...state.subscribed].filter((id) => !wanted.has(id));
    if (removed.length) {
      send({ op: "unsubscribe", token_ids: removed });
      removed.forEach((id) => state.subscribed.delete(id));
    }
    if (added.length) {
      const since = {};
      for (const id of added) if (state.seqs[id] !== undefined) since[id] = state.seqs[id];
      const message = { op: "subscribe", token_ids: added };
      if (Object.keys(since).length) message.since_seq = since;
      send(message);
      added.forEach((id) => state.subscribed.add(id));
    }
  }

  function applySample(tokenId, seq, sample) {
    if (seq !== undefined && seq !== null) state.seqs[tokenId] = seq;
    const row = state.rows.get(tokenId);
    if (!sample || !row) return;
    if (Date.parse(sample.ts) < Date.parse(row.ts)) return; // a late sample: keep the newest
    const changed = row.ts !== sample.ts || row.velocity !== sample.velocity || row.price_usd !== sample.price_usd;
    for (const field of ["symbol", "name", "cmc_rank", "ts", "price_usd", "market_cap_usd", "volume_24h_usd",
      "percent_change_24h", "velocity", "velocity_7d", "trend", "data_quality_score"]) {
      if (sample[field] !== undefined) row[field] = sample[field];
    }
    noteAsOf(sample.ts, null);
    if (!changed) return;
    row.receivedAt = Date.now();
    renderTable(tokenId);
    if (tokenId === state.selected) liveDetail(sample);
  }

  function onMessage(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    if (message.op === "snapshot" || message.op === "update") {
      applySample(message.token_id, message.seq, message.sample);
    } else if (message.op === "subscribed") {
      wsStatus("live (" + state.subscribed.size + " tokens)", "live");
    } else if (message.op === "error") {
      say("WebSocket: " + message.message);
      if (message.token_ids) message.token_ids.forEach((id) => state.subscribed.delete(id));
    }
  }

  function connect() {
    const generation = state.generation;
    clearTimeout(state.retryTimer);
    const url = state.wsUrl + (state.wsUrl.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(state.key);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      wsStatus("unavailable: " + err.message, "error");
      return;
    }
    state.ws = ws;
    wsStatus("connecting…", "connecting");
    ws.onopen = () => {
      state.retries = 0;
      state.subscribed.clear();
      syncSubscriptions();
    };
    ws.onmessage = onMessage;
    ws.onclose = (event) => {
      if (generation !== state.generation) return;
      state.ws = null;
      state.subscribed.clear();
      if (event.code === 4001) {
        wsStatus("key rejected: " + event.reason, "error");
        return;
      }
      const wait = Math.min(MAX_RETRY_SECONDS, 2 ** state.retries);
      state.retries += 1;
      wsStatus("disconnected, retrying in " + wait + "s", "error");
      state.retryTimer = setTimeout(connect, wait * 1000);
    };
  }

  // ------------------------------------------------------------------------------ charts

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function drawWindows(values) {
    const width = 420;
    const height = 170;
    const base = 140;
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "velocity windows" });
    const known = WINDOWS.map((w) => num(values[w])).filter((v) => v !== null);
    const top = Math.max(...known, 1e-9);
    const slot = width / WINDOWS.length;
    WINDOWS.forEach((w, i) => {
      const v = num(values[w]);
      const x = i * slot + slot * 0.2;
      const h = v === null ? 0 : (v / top) * (base - 20);
      chart.appendChild(svg("rect", { x: x, y: base - h, width: slot * 0.6, height: Math.max(h, 1), class: "bar" }));
      chart.appendChild(svg("text", { x: x + slot * 0.3, y: base - h - 5, class: "value" }, v === null ? "no data" : v.toFixed(4)));
      chart.appendChild(svg("text", { x: x + slot * 0.3, y: base + 18, class: "label" }, w));
    });
    chart.appendChild(svg("line", { x1: 0, y1: base, x2: width, y2: base, class: "axis" }));
    $("windows-chart").replaceChildren(chart);
  }

  function drawHistory(points) {
    const width = 420;
    const height = 190;
    const pad = { left: 52, right: 8, top: 10, bottom: 30 };
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "velocity history" });
    if (points.length < 2) {
      chart.appendChild(svg("text", { x: width / 2, y: height / 2, class: "label" }, "not enough history"));
      $("history-chart").replaceChildren(chart);
      return;
    }
    const t0 = points[0].t;
    const t1 = points[points.length - 1].t;
    let lo = Math.min(...points.map((p) => p.v));
    let hi = Math.max(...points.map((p) => p.v));
    if (hi === lo) {
      hi += Math.abs(hi) * 0.05 || 1e-6;
      lo -= Math.abs(lo) * 0.05 || 1e-6;
    }
    const x = (t) => pad.left + ((t - t0) / (t1 - t0 || 1)) * (width - pad.left - pad.right);
    const y = (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
    const bottom = height - pad.bottom;
    chart.appendChild(svg("line", { x1: pad.left, y1: bottom, x2: width - pad.right, y2: bottom, class: "axis" }));
    chart.appendChild(svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: bottom, class: "axis" }));
    chart.appendChild(svg("text", { x: pad.left - 4, y: pad.top + 8, class: "tick end" }, hi.toFixed(4)));
    chart.appendChild(svg("text", { x: pad.left - 4, y: bottom, class: "tick end" }, lo.toFixed(4)));
    chart.appendChild(svg("text", { x: pad.left, y: height - 8, class: "tick start" }, utc(t0).slice(5, 16)));
    chart.appendChild(svg("text", { x: width - pad.right, y: height - 8, class: "tick end" }, utc(t1).slice(5, 16)));
    const line = points.map((p) => x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ");
    chart.appendChild(svg("polyline", { points: line, class: "line" }));
    const last = points[points.length - 1];
    chart.appendChild(svg("circle", { cx: x(last.t), cy: y(last.v), r: 3, class: "dot" }));
    $("history-chart").replaceChildren(chart);
  }

  async function select(tokenId) {
    state.selected = tokenId;
    for (const tr of document.querySelectorAll("#tokens tbody tr")) {
      tr.classList.toggle("selected", Number(tr.dataset.cmcId) === tokenId);
    }
    const row = state.rows.get(tokenId);
    $("detail").hidden = false;
    $("detail-title").textContent = row ? row.symbol + " — " + row.name : "#" + tokenId;
    $("detail-meta").textContent = "loading…";
    try {
      const [velocity, history] = await Promise.all([
        api("/v1/tokens/" + tokenId + "/velocity"),
        api("/v1/tokens/" + tokenId + "/history?interval=5m"),
      ]);
      if (state.selected !== tokenId) return;
      const data = velocity.data;
      const windows = {};
      for (const w of WINDOWS) windows[w] = data.windows[w] ? data.windows[w].velocity : null;
      drawWindows(windows);
      state.history = history.data
        .filter((p) => p.velocity !== null)
        .map((p) => ({ t: Date.parse(p.ts), v: Number(p.velocity) }));
      drawHistory(state.history);
      $("detail-meta").textContent = "trend " + data.trend.direction.replace("_", " ") + ", quality " +
        data.data_quality_score.toFixed(2) + ", calculated at " + utc(Date.parse(data.calculated_at)) + " UTC";
    } catch (err) {
      $("detail-meta").textContent = "Could not load the charts: " + err.message;
    }
  }

  function liveDetail(sample) {
    const windows = {};
    for (const w of WINDOWS) windows[w] = sample["velocity_" + w];
    drawWindows(windows);
    const t = Date.parse(sample.ts);
    const last = state.history[state.history.length - 1];
    if (sample.velocity !== null && (!last || t > last.t)) {
      state.history.push({ t: t, v: Number(sample.velocity) });
      drawHistory(state.history);
    }
    $("detail-meta").textContent = "trend " + sample.trend.replace("_", " ") + ", quality " +
      Number(sample.data_quality_score).toFixed(2) + ", live sample at " + utc(t) + " UTC";
  }

  // ------------------------------------------------------------------------------ start

  async function start() {
    state.generation += 1;
    clearTimeout(state.retryTimer);
    if (state.ws) state.ws.close(1000);
    state.ws = null;
    state.seqs = {};
    state.selected = null;
    say("");
    try {
      const config = await fetch("/dashboard/config.json").then((r) => r.json());
      state.wsUrl = config.ws_url;
      await loadTokens();
      connect();
    } catch (err) {
      say("Could not load tokens: " + err.message);
    }
  }

  function init() {
    const input = $("api-key");
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = input.value.trim();
      if (!state.key) return say("Enter an API key (tokvel keys create --name N).");
      localStorage.setItem(KEY_STORAGE, state.key);
      start();
    });
    for (const th of document.querySelectorAll("th.sortable")) {
      th.addEventListener("click", () => sortBy(th.dataset.sort));
      th.addEventListener("keydown", (event) => {
        if (event.key === "Enter") sortBy(th.dataset.sort);
      });
    }
    const tbody = document.querySelector("#tokens tbody");
    const pick = (event) => {
      const tr = event.target.closest("tr");
      if (tr) select(Number(tr.dataset.cmcId));
    };
    tbody.addEventListener("click", pick);
    tbody.addEventListener("keydown", (event) => {
      if (event.key === "Enter") pick(event);
    });
    setInterval(tick, 1000);
    const saved = localStorage.getItem(KEY_STORAGE);
    if (saved) {
      input.value = saved;
      state.key = saved;
      start();
    } else {
      say("Enter an API key to start.");
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();
