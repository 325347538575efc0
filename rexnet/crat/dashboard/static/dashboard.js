"use strict";
(() => {
  const POLL_MS = 5000, RESYNC_MS = 30000, RENDER_MS = 250;
  const SVG = "http://www.w3.org/2000/svg";
  const COUNTS = [["received", "received"], ["verified", "verified"],
    ["unverified", "unverified"], ["garbage", "garbage"], ["ignored", "ignored"],
    ["dropped_verified", "dropped (verified)"], ["dropped_unverified", "dropped (other)"],
    ["sink_errors", "sink errors"], ["errors", "errors"]];
  const FIRST = ["job", "status", "signal", "limit", "duration", "bytes_in", "bytes_out",
    "worker", "client", "what"];
  const st = { workers: new Map(), jobs: new Map(), alerts: [], unverified: [],
    counts: {}, trusted: [],
    history: 120, maxAlerts: 50, interval: 5, offset: 0, fresh: new Set() };
  let es = null, pollTimer = null, renderTimer = null, lastUpdate = null;

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function td(text, cls) { return el("td", cls, text); }
  const serverNow = () => Date.now() / 1000 + st.offset;

  function ago(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function bytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function num(x, digits) {
    return typeof x === "number" ? (digits === undefined ? String(x) : x.toFixed(digits)) : "";
  }
  function clock(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString();
  }

  // -- state ---------------------------------------------------------------------------

  function load(s) {
    st.offset = s.now - Date.now() / 1000;
    st.history = s.limits.history; st.maxAlerts = s.limits.alerts;
    st.interval = s.limits.status_interval;
    st.workers = new Map(s.workers.map((w) => [w.key, w]));
    st.jobs = new Map(s.running.map((j) => [j.key, j]));
    st.finished = (s.finished || []).slice(0, 100);
    st.alerts = s.alerts.slice(0, st.maxAlerts);
    st.unverified = (s.unverified || []).slice(0, st.maxAlerts);
    st.counts = s.counts; st.trusted = s.trusted;
    lastUpdate = Date.now();
    scheduleRender();
  }

  function apply(u) {
    st.offset = u.now - Date.now() / 1000;
    if (u.worker) {
      const old = st.workers.get(u.worker.key);
      const w = Object.assign({}, u.worker, { history: old ? old.history : [] });
      if (u.point) {
        w.history = w.history.concat([u.point]);
        if (w.history.length > st.history) w.history = w.history.slice(-st.history);
      }
      st.workers.set(w.key, w);
    }
    if (u.job_started) st.jobs.set(u.job_started.key, u.job_started);
    for (const key of u.jobs_ended || []) st.jobs.delete(key);
    st.finished = (u.jobs_finished || []).concat(st.finished || []).slice(0, 100);
    if (u.alert) {  // verified and unverified alerts are kept apart, each list bounded
      const list = u.alert.verified ? st.alerts : st.unverified;
      list.unshift(u.alert);
      st.fresh.add(u.alert);
      if (list.length > st.maxAlerts) list.length = st.maxAlerts;
    }
    if (u.counts) st.counts = u.counts;
    lastUpdate = Date.now();
    scheduleRender();
  }

  async function fetchState() {
    try {
      const r = await fetch("/api/state", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      load(await r.json());
      return true;
    } catch (e) {
      if (!es || es.readyState !== EventSource.OPEN) setMode("offline");
      return false;
    }
  }

  // -- connection ----------------------------------------------------------------------

  function setMode(mode) {
    const c = $("conn");
    c.dataset.mode = mode;
    c.textContent = { live: "live", polling: "polling every " + POLL_MS / 1000 + " s",
      offline: "cannot reach crat", connecting: "connecting\u2026" }[mode] || mode;
    document.body.dataset.mode = mode;
  }

  function startPolling() {
    if (pollTimer !== null) return;
    const tick = async () => { if (await fetchState()) setMode("polling"); };
    pollTimer = setInterval(tick, POLL_MS);
    tick();
  }
  function stopPolling() {
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
  }

  function connect() {
    const forcePoll = new URLSearchParams(location.search).has("poll");
    if (forcePoll || typeof EventSource === "undefined") { startPolling(); return; }
    es = new EventSource("/api/events");
    es.addEventListener("open", () => { stopPolling(); setMode("live"); fetchState(); });
    es.addEventListener("update", (e) => {
      try { apply(JSON.parse(e.data)); } catch (err) { fetchState(); }
    });
    es.addEventListener("resync", () => fetchState());
    es.addEventListener("error", () => {
      // the browser reconnects by itself unless the stream is CLOSED; poll meanwhile
      startPolling();
    });
    setInterval(() => { if (es.readyState === EventSource.OPEN) fetchState(); }, RESYNC_MS);
  }

  // -- rendering (textContent only: nothing from an alert is ever markup) ---------------

  function scheduleRender() {
    if (renderTimer === null) renderTimer = setTimeout(render, RENDER_MS);
  }

  function render() {
    renderTimer = null;
    renderCounts(); renderWorkers(); renderJobs(); renderFinished();
    renderAlerts(st.alerts, "alerts"); renderAlerts(st.unverified, "unverified");
    st.fresh.clear();
    $("trusted").textContent = st.trusted.length ? "trusting " + st.trusted.join(", ") : "";
    $("updated").textContent = lastUpdate ?
      "updated " + new Date(lastUpdate).toLocaleTimeString() : "";
  }

  function renderCounts() {
    const dl = el("dl"); dl.id = "counts";
    for (const [key, label] of COUNTS) {
      const v = st.counts[key];
      if (typeof v !== "number" || (v === 0 && !["received", "verified", "unverified"]
        .includes(key))) continue;
      const d = el("div"); d.dataset.count = key;
      d.append(el("dt", null, label), el("dd", null, v));
      dl.append(d);
    }
    $("counts").replaceWith(dl);
  }

  function sparkline(history, now) {
    // the window: from the oldest point kept (at least a minute) up to now
    const W = 180, H = 32, full = st.history * st.interval;
    const oldest = history.length ? history[0][0] : now;
    const span = Math.min(full, Math.max(60, now - oldest));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const loads = history.map((p) => p[1]);
    const top = Math.max(1, ...loads);
    const y = (v) => (H - 2 - (H - 4) * Math.min(v, top) / top).toFixed(1);
    const x = (t) => (W * (1 - Math.min(span, Math.max(0, now - t)) / span)).toFixed(1);
    const title = document.createElementNS(SVG, "title");
    title.textContent = loads.length ? "load over the last " + ago(span) + ": min " +
      Math.min(...loads).toFixed(2) + ", max " + Math.max(...loads).toFixed(2) :
      "no load figures yet";
    svg.append(title);
    if (top > 1) {  // where a load of 1 (every CPU and slot busy) is
      const one = document.createElementNS(SVG, "line");
      one.setAttribute("class", "one");
      one.setAttribute("x1", "0"); one.setAttribute("x2", String(W));
      one.setAttribute("y1", y(1)); one.setAttribute("y2", y(1));
      svg.append(one);
    }
    if (history.length) {
      const pts = history.map((p) => x(p[0]) + "," + y(p[1]));
      if (pts.length === 1) pts.unshift((x(history[0][0]) - 2) + "," + y(history[0][1]));
      const area = document.createElementNS(SVG, "polygon");
      area.setAttribute("class", "area");
      const first = pts[0].split(",")[0], last = pts[pts.length - 1].split(",")[0];
      area.setAttribute("points", first + "," + H + " " + pts.join(" ") + " " + last + "," + H);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", "line");
      line.setAttribute("points", pts.join(" "));
      svg.append(area, line);
    }
    return svg;
  }

  function renderWorkers() {
    const now = serverNow();
    const workers = [...st.workers.values()].sort((a, b) =>
      a.app < b.app ? -1 : a.app > b.app ? 1 : a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    const body = el("tbody");
    for (const w of workers) {
      const heard = w.status_seen !== null ? w.status_seen : w.seen;
      const silent = now - heard > 3 * st.interval + 5;
      const tr = el("tr", silent ? "stale" : null);
      tr.dataset.worker = w.key;
      const name = td(w.name, "name");
      name.title = "alerts signed by the certificate " + String(w.sender) +
        (w.claimed && w.claimed !== w.sender ? ", calling itself " + String(w.claimed) : "");
      if (silent) { name.append(" ", el("span", "badge silent", "silent")); }
      const spark = td(null, "spark-cell");
      spark.append(sparkline(w.history || [], now));
      tr.append(name, td(w.app), td(w.address, "mono"), spark,
        td(num(w.load, 2), "num load"),
        td(typeof w.running === "number" ? w.running + " / " + num(w.slots) : "", "num"),
        td(num(w.cpus), "num"), td(num(w.speed), "num"), td(bytes(w.free_memory), "num"),
        td(num(w.jobs_run), "num"), td(ago(now - w.seen) + " ago", "heard"));
      body.append(tr);
    }
    $("workers").tBodies[0].replaceWith(body);
    $("worker-count").textContent = workers.length ? "(" + workers.length + ")" : "";
    $("workers-empty").classList.toggle("hidden", workers.length > 0);
  }

  function renderJobs() {
    const now = serverNow();
    const jobs = [...st.jobs.values()].sort((a, b) => a.started - b.started);
    const body = el("tbody");
    for (const j of jobs) {
      const tr = el("tr");
      tr.dataset.job = j.job;
      tr.append(td(j.job, "mono job"), td(j.app), td(j.worker, "worker"), td(j.client),
        td(j.client_addr, "mono"), td(j.command, "mono"), td(ago(now - j.started)),
        td(j.detached ? "detached" : ""));
      body.append(tr);
    }
    $("jobs").tBodies[0].replaceWith(body);
    $("job-count").textContent = jobs.length ? "(" + jobs.length + ")" : "";
    $("jobs-empty").classList.toggle("hidden", jobs.length > 0);
  }

  function renderFinished() {  // finished jobs' history, newest first
    const now = serverNow();
    const body = el("tbody");
    for (const j of st.finished || []) {
      const tr = el("tr");
      tr.dataset.job = j.job;
      tr.append(td(j.job, "mono job"), td(j.app), td(j.worker, "worker"), td(j.client),
        td(j.command, "mono"), td(j.status === null ? "?" : String(j.status), "num"),
        td(j.duration === null ? "" : num(j.duration, 1) + " s", "num"),
        td(ago(now - j.ended) + " ago"), td(j.detached ? "detached" : ""));
      body.append(tr);
    }
    $("finished").tBodies[0].replaceWith(body);
    $("finished-empty").classList.toggle("hidden", (st.finished || []).length > 0);
  }

  function renderAlerts(alerts, id) {
    const body = el("tbody");
    for (const a of alerts) {
      const tr = el("tr", a.verified ? "alert" : "alert unverified");
      if (st.fresh.has(a)) tr.classList.add("fresh");
      tr.dataset.event = String(a.event);
      tr.dataset.verified = a.verified ? "yes" : "no";
      const fields = a.fields || {};
      if (typeof fields.job === "string") tr.dataset.job = fields.job;
      const event = td(null, "ev");
      if (!a.verified) event.append(el("span", "badge unverified", "UNVERIFIED"), " ");
      event.append(el("span", "event", a.event));
      if (!a.verified && a.reason) event.append(el("span", "reason", a.reason));
      const who = [a.app, a.role, a.sender].map((v) => (v === null ? "?" : String(v)));
      const details = td(null, "details");
      const keys = Object.keys(fields);
      const order = FIRST.filter((k) => k in fields).concat(
        keys.filter((k) => !FIRST.includes(k)).sort());
      for (const k of order) {
        const f = el("span", "field");
        f.append(el("span", "k", k + "="), el("span", "v", fields[k]));
        details.append(f);
      }
      tr.append(td(clock(a.received), "time"), event, td(who.join(" ")), details,
        td(a.source, "mono"));
      body.append(tr);
    }
    $(id).tBodies[0].replaceWith(body);
    $(id + "-empty").classList.toggle("hidden", alerts.length > 0);
  }

  setInterval(scheduleRender, 5000);  // ages and silent workers move on by themselves
  setMode("connecting");
  fetchState();
  connect();
})();
