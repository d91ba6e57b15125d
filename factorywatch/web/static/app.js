// factorywatch web view: one server-sent event stream, inline SVG charts, no libraries.
"use strict";
const FW = (() => {
  const MAX_POINTS = 300;
  const machines = new Map(); // key "line/machine" -> machine record with series
  let me = { user: "", role: "viewer" };
  // operators act on alerts and models; admins are operators who also manage accounts
  const canAct = () => me.role === "operator" || me.role === "admin";
  let onChange = () => {};
  let afterAction = () => {};

  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const fmt = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
  // Every time in UTC, 24-hour, as the CLI prints them (the page says so where times show).
  const iso = (ts) => new Date(ts * 1000).toISOString();
  const time = (ts) => (ts ? iso(ts).slice(11, 19) : "–");
  const when = (ts) => (ts ? `${iso(ts).slice(0, 10)} ${iso(ts).slice(11, 19)}` : "–");
  const ago = (ts) => {
    if (!ts) return "–";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  };
  // The tile's badge: the alert state, unless the latest reading says more than it does (an
  // anomalous reading before k of n open an alert is a warning, not "NORMAL").
  const badge = (m) => {
    if (m.state === "OFFLINE") return { cls: "OFFLINE", text: "OFFLINE", title: "no readings" };
    if (m.alert_id) return { cls: "ALERT", text: m.acknowledged_by ? "ALERT ✓" : "ALERT", title: "an alert is open" };
    if ((m.last_status || "").startsWith("CALIBRATING")) return { cls: "UNKNOWN", text: "CALIBRATING", title: m.last_status };
    if (m.last_status === "ALERT") return { cls: "WARN", text: "ANOMALOUS READING", title: "the latest reading scored above its threshold; an alert opens when enough of the recent ones do" };
    const state = m.state || "UNKNOWN";
    return { cls: state, text: state, title: "" };
  };
  const labelBadge = (label, by) => (label ? `<span class="badge ${esc(label)}">${esc(label.replace("_", " "))}</span>${by ? ` <span class="muted">${esc(by)}</span>` : ""}` : "");
  const features = (ex, outside, surprise) => {
    const beyond = (outside || []).length ? `<b>outside training range:</b> ${outside.map(esc).join(", ")}; ` : "";
    const unusual = surprise != null ? `<b>unusual for this machine lately</b> (surprise ${fmt(surprise, 1)}); ` : "";
    return beyond + unusual + ((ex || []).slice(0, 3).map((c) => `${esc(c.feature)} <span class="muted">z ${c.z >= 0 ? "+" : ""}${fmt(c.z, 1)}</span>`).join(", ") || "–");
  };

  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Requested-With": "factorywatch" },
      body: JSON.stringify(body),
    };
    const resp = await fetch(path, { credentials: "same-origin", ...opts });
    if (resp.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
    return data;
  }

  function merge(m) {
    const old = machines.get(m.key) || { points: [], readings: [] };
    const rec = { ...old, ...m };
    if (m.points) rec.points = m.points; // a snapshot replaces the series
    if (m.readings) rec.readings = m.readings;
    const lastP = rec.points.length ? rec.points[rec.points.length - 1][0] : -Infinity;
    for (const p of m.new_points || []) if (p[0] > lastP || !rec.points.length) rec.points.push(p);
    const lastR = rec.readings.length ? rec.readings[rec.readings.length - 1][0] : -Infinity;
    for (const r of m.new_readings || []) if (r[0] > lastR || !rec.readings.length) rec.readings.push(r);
    rec.points = rec.points.slice(-MAX_POINTS);
    rec.readings = rec.readings.slice(-MAX_POINTS);
    delete rec.new_points; delete rec.new_readings;
    machines.set(m.key, rec);
  }

  function setLink(up) {
    const el = document.getElementById("link");
    el.textContent = up ? "live" : "broker unreachable – reconnecting";
    el.className = `pill ${up ? "up" : "down"}`;
  }

  function connect() {
    const source = new EventSource("/api/stream");
    source.addEventListener("snapshot", (e) => {
      const data = JSON.parse(e.data);
      machines.clear();
      data.machines.forEach(merge);
      setLink(data.connected);
      onChange(true);
    });
    source.addEventListener("update", (e) => {
      const data = JSON.parse(e.data);
      data.machines.forEach(merge);
      (data.removed || []).forEach((k) => machines.delete(k));
      setLink(data.connected);
      onChange(false);
    });
    source.onerror = () => setLink(false); // EventSource reconnects by itself
  }

  async function whoami() {
    me = await api("/api/me");
    document.getElementById("who").textContent = `${me.user} · ${me.role}`;
    document.body.dataset.role = me.role;
    document.getElementById("accounts-link").hidden = me.role !== "admin";
    banner();
  }

  // Whether alerts reach anyone beyond this page (Alertmanager's receivers, via the server).
  async function banner() {
    const el = document.getElementById("notify-banner");
    const n = await api("/api/notifications").catch(() => null);
    if (!n) return;
    let text = "", cls = "warn";
    if (!n.alertmanager) {
      text = "No notification receiver configured for this view: alerts show here and reach no one else unless <code>factorywatch notify</code> sends them to Alertmanager (start the view with <code>--alertmanager-url</code> to check its receivers).";
      cls = "info";
    } else if (!n.reachable) {
      text = `Alertmanager at ${esc(n.alertmanager)} does not answer: notifications may not go out.`;
    } else if (n.receivers_without_channels.length) {
      text = `No notification receiver configured: Alertmanager routes alerts to <b>${n.receivers_without_channels.map(esc).join(", ")}</b>, which has no channel (email, Slack, webhook). Alerts show here and in Alertmanager and notify no one.`;
    }
    el.innerHTML = text;
    el.className = `banner ${cls}`;
    el.hidden = !text;
  }

  // -- charts (inline SVG) ------------------------------------------------------------------
  function spark(points, threshold) {
    const W = 240, H = 46, P = 3;
    if (!points.length) return `<svg class="spark" viewBox="0 0 ${W} ${H}"><text x="4" y="28" class="axis">waiting for readings…</text></svg>`;
    const ys = points.map((p) => p[1]).concat(threshold ? [threshold] : []);
    const lo = Math.min(...ys) - 0.02, hi = Math.max(...ys) + 0.02;
    const x = (i) => P + (i * (W - 2 * P)) / Math.max(1, points.length - 1);
    const y = (v) => H - P - ((v - lo) * (H - 2 * P)) / (hi - lo || 1);
    const line = points.map((p, i) => `${x(i).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    const dots = points.map((p, i) => (p[3] === "ALERT" ? `<circle cx="${x(i).toFixed(1)}" cy="${y(p[1]).toFixed(1)}" r="2.2" fill="#d64545"/>` : "")).join("");
    const thr = threshold ? `<line x1="0" x2="${W}" y1="${y(threshold)}" y2="${y(threshold)}" stroke="#d64545" stroke-dasharray="3 3" stroke-width="1" opacity=".7"/>` : "";
    return `<svg class="spark" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${thr}<polyline points="${line}" fill="none" stroke="#2f6fde" stroke-width="1.5" vector-effect="non-scaling-stroke"/>${dots}</svg>`;
  }

  // A chart's value range with a margin; a series that never goes below zero (tool wear,
  // speeds, torque) keeps its axis at zero or above instead of showing "-11.4".
  function axisRange(ys) {
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 1;
    const floor = y0 >= 0 ? 0 : -Infinity;
    y0 = Math.max(y0 - pad, floor); y1 += pad;
    return [y0, y1];
  }

  function chart(el, series, { height = 220, threshold = null, digits = 2 } = {}) {
    const W = Math.max(300, el.clientWidth || 600), H = height, L = 52, R = 12, T = 10, B = 24;
    const all = series.flatMap((s) => s.values);
    if (!all.length) { el.innerHTML = `<svg viewBox="0 0 ${W} ${H}"><text x="${L}" y="${H / 2}" class="axis">waiting for readings…</text></svg>`; return; }
    const xs = all.map((v) => v[0]), ys = all.map((v) => v[1]).concat(threshold !== null ? [threshold] : []);
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const [y0, y1] = axisRange(ys);
    const x = (v) => L + ((v - x0) * (W - L - R)) / (x1 - x0 || 1);
    const y = (v) => T + ((y1 - v) * (H - T - B)) / (y1 - y0 || 1);
    let svg = `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}">`;
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      svg += `<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#eef1f5"/><text x="${L - 6}" y="${y(v) + 3}" text-anchor="end" class="axis">${v.toFixed(digits)}</text>`;
    }
    // as many time labels as fit without touching (an "HH:MM:SS" label is about 50 px wide)
    const ticks = Math.max(1, Math.min(4, Math.floor((W - L - R) / 110)));
    for (let i = 0; i <= ticks; i++) {
      const v = x0 + ((x1 - x0) * i) / ticks;
      svg += `<text x="${x(v)}" y="${H - 6}" text-anchor="${i === 0 ? "start" : i === ticks ? "end" : "middle"}" class="axis x">${time(v)}</text>`;
    }
    if (threshold !== null) svg += `<line x1="${L}" x2="${W - R}" y1="${y(threshold)}" y2="${y(threshold)}" stroke="#d64545" stroke-dasharray="5 4"/><text x="${W - R}" y="${y(threshold) - 4}" text-anchor="end" class="axis" fill="#d64545">threshold ${threshold.toFixed(3)}</text>`;
    for (const s of series) {
      const pts = s.values.map((v) => `${x(v[0]).toFixed(1)},${y(v[1]).toFixed(1)}`).join(" ");
      svg += `<polyline points="${pts}" fill="none" stroke="${s.color}" stroke-width="1.6"/>`;
      if (s.marks) svg += s.values.filter((v) => v[2]).map((v) => `<circle cx="${x(v[0]).toFixed(1)}" cy="${y(v[1]).toFixed(1)}" r="3" fill="#d64545"/>`).join("");
    }
    el.innerHTML = svg + "</svg>";
  }

  // -- actions ------------------------------------------------------------------------------
  async function act(button, path, body) {
    button.disabled = true;
    try { await api(path, body); button.textContent = "sent ✓"; afterAction(); } // the label itself comes back on the stream
    catch (err) { button.disabled = false; alert(err.message); }
  }
  // Re-render a part holding note inputs, unless the operator is typing a note there and
  // the alerts it shows are the same ones (live updates come twice a second).
  function setKeepingNotes(el, html, key) {
    const typing = el.querySelector("input.note:focus") || [...el.querySelectorAll("input.note")].some((i) => i.value);
    if (typing && el.dataset.key === key) return;
    el.innerHTML = html;
    el.dataset.key = key;
  }
  const noteInput = () => '<input class="note" maxlength="500" placeholder="note (optional)">';
  function actionButtons(line, machine, alertId, acknowledged) {
    if (!canAct() || !alertId) return "";
    const data = `data-line="${esc(line)}" data-machine="${esc(machine)}" data-alert="${esc(alertId)}"`;
    return noteInput() + (acknowledged === false ? `<button class="ack" ${data}>Acknowledge</button>` : "")
      + `<button class="danger false-alarm" ${data}>False alarm</button>`;
  }
  document.addEventListener("click", (e) => {
    const b = e.target.closest("button.ack, button.false-alarm, button.confirm");
    if (!b) return;
    e.preventDefault();
    const note = (b.parentElement.querySelector("input.note") || {}).value || undefined;
    const body = { line: b.dataset.line, machine: b.dataset.machine, alert_id: b.dataset.alert, note };
    if (b.classList.contains("ack")) act(b, "/api/ack", body);
    else act(b, "/api/feedback", { ...body, label: b.classList.contains("confirm") ? "confirmed" : "false_alarm" });
  });
  document.addEventListener("click", (e) => {
    const b = e.target.closest("button.threshold-action");
    if (!b) return;
    e.preventDefault();
    act(b, "/api/threshold", { line: b.dataset.line, machine: b.dataset.machine, action: b.dataset.action });
  });

  // -- overview -----------------------------------------------------------------------------
  function renderOverview() {
    const list = [...machines.values()].sort((a, b) => a.key.localeCompare(b.key));
    const open = list.filter((m) => m.alert_id);
    const offline = list.filter((m) => m.state === "OFFLINE");
    document.getElementById("summary").innerHTML = [
      ["Machines", list.length], ["Open alerts", open.length], ["Offline", offline.length],
      ["Normal", list.filter((m) => m.state === "NORMAL").length],
    ].map(([k, v]) => `<div class="card"><div class="muted">${k}</div><div class="num">${v}</div></div>`).join("");
    const body = document.querySelector("#alerts tbody");
    setKeepingNotes(body, open.map((m) => `<tr data-machine="${esc(m.machine_id)}">
      <td><a href="/machine/${encodeURIComponent(m.line)}/${encodeURIComponent(m.machine_id)}"><b>${esc(m.machine_id)}</b></a></td>
      <td>${esc(m.line)}</td><td>${when(m.alert_since)} <span class="muted">(${ago(m.alert_since)})</span></td>
      <td>${fmt(m.peak_score)}</td><td>${features(m.explanation, m.outside_training, m.surprise)}</td>
      <td>${m.acknowledged_by ? `✓ ${esc(m.acknowledged_by)}` : '<span class="muted">not yet</span>'}</td>
      <td class="label">${labelBadge(m.label, m.labelled_by) || '<span class="muted">–</span>'}</td>
      <td class="actions">${actionButtons(m.line, m.machine_id, m.alert_id, Boolean(m.acknowledged_by))}</td></tr>`).join(""),
    open.map((m) => `${m.alert_id}|${m.acknowledged_by}|${m.label}`).join(","));
    document.getElementById("no-alerts").hidden = open.length > 0;
    document.getElementById("alerts").hidden = open.length === 0;
    document.getElementById("tiles").innerHTML = list.map((m) => {
      const b = badge(m);
      const reading = m.last_status ? `last reading ${m.last_status === "ALERT" ? "anomalous" : esc(m.last_status.toLowerCase())}` : "";
      const above = m.last_score !== null && m.threshold !== null && m.last_score > m.threshold;
      const seen = m.last_seen || (m.points.length ? m.points[m.points.length - 1][0] : null);
      return `<a class="tile ${esc(b.cls)}" id="tile-${esc(m.machine_id)}" href="/machine/${encodeURIComponent(m.line)}/${encodeURIComponent(m.machine_id)}">
        <div class="top"><span class="name">${esc(m.machine_id)}</span><span class="badge ${esc(b.cls)}" title="${esc(b.title)}">${esc(b.text)}</span></div>
        <div class="facts"><span>line ${esc(m.line)}</span><span>${reading}</span></div>
        <div class="facts"><span>score <span class="score${above ? " above" : ""}">${fmt(m.last_score)}</span></span><span>threshold ${fmt(m.threshold)}</span></div>
        ${spark(m.points, m.threshold)}
        <div class="facts"><span>${m.alerts_raised} alert(s) raised ${labelBadge(m.label)}</span><span class="seen" title="${when(seen)} UTC">seen ${ago(seen)}</span></div>
        ${rateFact(m)}
      </a>`;
    }).join("") || '<p class="muted">No machine has reported yet.</p>';
  }

  // a machine's realized alarm rate against its bound, and its own threshold when changed
  function rateFact(m) {
    const parts = [];
    if (m.alarm_rate !== null && m.alarm_rate !== undefined) {
      const cls = m.alarm_rate_out_of_bound ? "badge ALERT" : "muted";
      const title = m.alarm_rate_out_of_bound ? "above 3 x its target: label its false alarms, widen its threshold, or recalibrate it if its normal operation has changed" : "share of ALERT verdicts over its recent readings (1,000 or more), as of its latest state change";
      parts.push(`<span class="alarm-rate ${cls}" title="${esc(title)}">alarm rate ${(100 * m.alarm_rate).toFixed(2)} % (bound ${(100 * m.alarm_rate_bound).toFixed(2)} %)</span>`);
    }
    if (m.own_threshold !== null && m.own_threshold !== undefined) {
      parts.push(`<span class="own-threshold">own threshold ${fmt(m.own_threshold)}</span>`);
    }
    return parts.length ? `<div class="facts">${parts.join("")}</div>` : "";
  }

  function thresholdChanges(m) {
    const rows = (m.threshold_changes || []).map((c) => `<li>${when(c.at)} UTC <b>${esc(c.by)}</b> ${esc(c.action.replace("_", " "))}: ${fmt(c.before)} → ${fmt(c.after)}${c.surprise_after != null && c.surprise_after !== c.surprise_before ? `, surprise cut ${fmt(c.surprise_before, 1)} → ${fmt(c.surprise_after, 1)}` : ""}${c.note ? ` — ${esc(c.note)}` : ""}</li>`).join("");
    const buttons = canAct() ? `<button class="secondary threshold-action" data-line="${esc(m.line)}" data-machine="${esc(m.machine_id)}" data-action="widen">Widen threshold</button><button class="secondary threshold-action" data-line="${esc(m.line)}" data-machine="${esc(m.machine_id)}" data-action="recalibrate" title="its normal operation has changed: clear its alert and fit it a new model on its next readings">Recalibrate</button>${m.own_threshold !== null && m.own_threshold !== undefined ? `<button class="secondary threshold-action" data-line="${esc(m.line)}" data-machine="${esc(m.machine_id)}" data-action="reset">Reset threshold</button>` : ""}` : "";
    return `${rateFact(m)}${rows ? `<ul class="threshold-changes">${rows}</ul>` : ""}${buttons}`;
  }

  async function overview() {
    await whoami();
    onChange = renderOverview;
    connect();
  }

  // -- machine page -------------------------------------------------------------------------
  async function machinePage() {
    const [, , line, machine] = location.pathname.split("/").map(decodeURIComponent);
    const key = `${line}/${machine}`;
    document.getElementById("title").textContent = machine;
    document.title = `factorywatch — ${machine}`;
    await whoami();
    let lastEpisode = null;
    const loadHistory = async () => {
      const range = document.getElementById("range").value;
      const data = await api(`/api/history?machine=${encodeURIComponent(machine)}&since=${encodeURIComponent(range)}`).catch(() => ({ alerts: [] }));
      const body = document.querySelector("#history tbody");
      // a refresh (live updates, a range change) that shows the same alerts keeps a note
      // the operator is typing in a row (the range is not part of the key: a wider range
      // that answers after the operator started typing shows the same rows)
      const key = data.alerts.map((a) => `${a.alert_id}:${a.open}:${a.label}:${a.note}:${a.acknowledged_by}`).join(",");
      setKeepingNotes(body, data.alerts.map((a) => `<tr data-alert="${esc(a.alert_id)}">
        <td>${when(a.raised_at)}</td><td>${a.open ? '<span class="badge ALERT">OPEN</span>' : when(a.cleared_at)}</td>
        <td>${fmt(a.peak_score)}</td><td>${features(a.explanation)}</td>
        <td>${a.acknowledged_by ? `✓ ${esc(a.acknowledged_by)}` : "–"}</td>
        <td class="label">${a.label ? labelBadge(a.label, a.labelled_by) : "–"}${a.note ? `<div class="note-text">${esc(a.note)}</div>` : ""}</td>
        <td class="actions">${canAct() ? `${noteInput()}<button class="danger false-alarm" data-line="${esc(line)}" data-machine="${esc(machine)}" data-alert="${esc(a.alert_id)}">False alarm</button><button class="secondary confirm" data-line="${esc(line)}" data-machine="${esc(machine)}" data-alert="${esc(a.alert_id)}">Confirm</button>` : ""}</td></tr>`).join(""), key);
      document.getElementById("no-history").hidden = data.alerts.length > 0;
    };
    const render = () => {
      const m = machines.get(key);
      if (!m) return;
      const b = badge(m);
      setKeepingNotes(document.getElementById("status"), `<span class="badge ${esc(b.cls)}" title="${esc(b.title)}">${esc(b.text)}</span>
        <span>line <b>${esc(m.line)}</b></span><span>last score <b>${fmt(m.last_score)}</b> (reading ${esc(m.last_status || "–")})</span>
        <span>threshold <b>${fmt(m.threshold)}</b></span><span>model <b>${esc(m.model_version || "–")}</b></span>
        ${m.alert_id ? `<span>alert open since <b>${when(m.alert_since)} UTC</b> ${labelBadge(m.label, m.labelled_by)}, peak ${fmt(m.peak_score)}, ${features(m.explanation, m.outside_training, m.surprise)}</span>
        ${m.acknowledged_by ? `<span>acknowledged by <b>${esc(m.acknowledged_by)}</b></span>` : ""} ${actionButtons(m.line, m.machine_id, m.alert_id, Boolean(m.acknowledged_by))}` : ""}
        <div id="tuning">${thresholdChanges(m)}</div>`,
      `${m.alert_id}|${m.acknowledged_by}|${m.label}|${m.state}|${m.own_threshold}|${(m.threshold_changes || []).length}|${m.alarm_rate_out_of_bound}|${m.alarm_rate === null ? "" : m.alarm_rate.toFixed(4)}`);
      chart(document.getElementById("score-chart"), [{ values: m.points.map((p) => [p[0], p[1], p[3] === "ALERT"]), color: "#2f6fde", marks: true }], { threshold: m.threshold, digits: 3 });
      const names = m.readings.length ? Object.keys(m.readings[m.readings.length - 1][1]) : [];
      const box = document.getElementById("channels");
      if (box.dataset.names !== names.join(",")) {
        box.innerHTML = names.map((n) => `<div class="card"><h3>${esc(n)}</h3><div class="ch" data-name="${esc(n)}"></div></div>`).join("") || '<p class="muted">No readings yet.</p>';
        box.dataset.names = names.join(",");
      }
      for (const el of box.querySelectorAll(".ch")) {
        const n = el.dataset.name;
        chart(el, [{ values: m.readings.filter((r) => n in r[1]).map((r) => [r[0], r[1][n]]), color: "#3a4556" }], { height: 120, digits: 1 });
      }
      const episode = `${m.alert_id}|${m.acknowledged_by}|${m.state}|${m.label}`;
      if (episode !== lastEpisode) { lastEpisode = episode; loadHistory(); }
    };
    onChange = render;
    connect();
    document.getElementById("range").addEventListener("change", loadHistory);
    loadHistory();
    loadModels(machine);
    window.addEventListener("resize", render);
    afterAction = loadHistory;
  }

  // -- model versions (machine page) --------------------------------------------------------
  const SCOPE_TITLES = { machine: "its own model", default: "the default model" };
  async function loadModels(machine) {
    const box = document.getElementById("models");
    const msg = document.getElementById("models-message");
    let data;
    try { data = await api(`/api/models?machine=${encodeURIComponent(machine)}`); }
    catch (err) { msg.textContent = err.message; msg.className = "error"; msg.hidden = false; return; }
    box.innerHTML = Object.entries(data.scopes).map(([scope, f]) => {
      const title = SCOPE_TITLES[scope] || esc(scope);
      if (!f.versions.length) return `<div class="model-scope" data-scope="${esc(scope)}"><h3>${title}</h3><p class="muted">no versions${scope === "machine" ? " (train one with <code>factorywatch train --machine</code>)" : ""}</p></div>`;
      const serving = data.serving === scope ? ' <span class="badge NORMAL">serves this machine</span>' : "";
      const back = canAct() && f.rollback_to ? `<button class="secondary rollback" data-machine="${esc(machine)}" data-scope="${esc(scope)}">Roll back to ${esc(f.rollback_to)}</button>` : "";
      const rows = f.versions.map((v) => v.error
        ? `<tr data-version="${esc(v.version)}"><td>${esc(v.version)}</td><td colspan="5" class="error">${esc(v.error)}</td></tr>`
        : `<tr data-version="${esc(v.version)}" class="${v.current ? "current" : ""}"><td><b>${esc(v.version)}</b>${v.current ? ' <span class="badge NORMAL">current</span>' : ""}</td>
          <td>${when(v.trained_at)}</td><td>${esc(v.family)} · ${esc(v.feature_set)}</td>
          <td>${v.forward_far === null || v.forward_far === undefined ? "–" : `${(v.forward_far * 100).toFixed(2)} %`}</td>
          <td class="muted small">${esc(v.summary)}</td>
          <td class="actions">${canAct() && !v.current ? `<button class="promote" data-machine="${esc(machine)}" data-scope="${esc(scope)}" data-version="${esc(v.version)}">Promote</button>` : ""}</td></tr>`).join("");
      const changes = f.log.slice(0, 5).map((e) => `<li>${when(e.at)} UTC: <b>${esc(e.by)}</b> ${e.action === "rollback" ? "rolled back to" : "promoted"} ${esc(e.version)}${e.previous ? ` (was ${esc(e.previous)})` : ""}</li>`).join("");
      return `<div class="model-scope card" data-scope="${esc(scope)}"><h3>${title}${serving} ${back}</h3>
        <table class="alerts"><thead><tr><th>Version</th><th>Trained (UTC)</th><th>Family · features</th><th>Forward false alarms</th><th>Card</th><th></th></tr></thead><tbody>${rows}</tbody></table>
        ${changes ? `<ul class="changes muted small">${changes}</ul>` : ""}</div>`;
    }).join("");
  }
  document.addEventListener("click", async (e) => {
    const b = e.target.closest("button.promote, button.rollback");
    if (!b) return;
    e.preventDefault();
    const msg = document.getElementById("models-message");
    b.disabled = true;
    try {
      const path = b.classList.contains("rollback") ? "/api/models/rollback" : "/api/models/promote";
      const done = await api(path, { machine: b.dataset.machine, scope: b.dataset.scope, version: b.dataset.version });
      msg.textContent = `${done.version} is now current (was ${done.previous || "none"}).`;
      msg.className = "muted";
    } catch (err) { msg.textContent = err.message; msg.className = "error"; }
    msg.hidden = false;
    loadModels(b.dataset.machine);
  });

  // -- accounts page ------------------------------------------------------------------------
  async function accountsPage() {
    await whoami();
    connect(); // the header's broker-link pill, as on the other pages
    const error = document.getElementById("accounts-error");
    const notice = document.getElementById("accounts-notice");
    const show = (el, text) => { el.textContent = text; el.hidden = !text; };
    const load = async () => {
      let data;
      try { data = await api("/api/accounts"); }
      catch (err) { show(error, err.message); return; }
      const select = document.getElementById("new-role");
      if (!select.options.length) select.innerHTML = data.roles.map((r) => `<option value="${esc(r)}">${esc(r)}</option>`).join("");
      document.getElementById("add-section").hidden = Boolean(data.read_only);
      if (data.read_only) show(notice, `Read-only here: ${data.read_only}. Add and remove accounts with factorywatch broker add-user / remove-user where the secrets folder is, then reload the broker (docker compose kill -s SIGHUP broker).`);
      else if (data.reload !== "signal") show(notice, `After a change, reload the broker yourself. ${data.reload}`);
      document.querySelector("#accounts tbody").innerHTML = data.accounts.map((a) => `<tr data-account="${esc(a.name)}">
        <td><b>${esc(a.name)}</b>${a.login ? "" : ' <span class="muted">(no login)</span>'}</td><td class="role">${esc(a.role)}</td><td>${esc(a.line || "–")}</td>
        <td>${esc((a.machines || []).join(", ") || "–")}</td><td>${esc(a.web_role || "–")}</td>
        <td class="scored">${a.scored === null ? "–" : a.scored ? `yes, last reading ${esc(time(a.scored))}` : '<span class="muted">no verdict yet</span>'}</td>
        <td class="actions">${a.protected || a.name === me.user || data.read_only ? "" : `<button class="danger remove-account" data-account="${esc(a.name)}">Remove</button>`}</td></tr>`).join("");
      // a machine with no verdict yet: look again until the detector has scored it
      clearTimeout(again);
      if (data.accounts.some((a) => a.scored === false)) again = setTimeout(load, 3000);
    };
    let again;
    document.getElementById("add-account").addEventListener("submit", async (e) => {
      e.preventDefault();
      const button = document.getElementById("add-submit");
      const secret = document.getElementById("new-password");
      button.disabled = true;
      try {
        const made = await api("/api/accounts", {
          name: document.getElementById("new-name").value.trim(), role: document.getElementById("new-role").value,
          line: document.getElementById("new-line").value.trim(), machines: document.getElementById("new-machines").value.trim(),
        });
        secret.innerHTML = `<b>${esc(made.what)}</b>: password <code id="shown-password">${esc(made.password)}</code> (shown once: copy it now). <span id="reload-message">${esc(made.message)}</span>`;
        secret.hidden = false;
        show(error, "");
        document.getElementById("new-name").value = "";
      } catch (err) { show(error, err.message); }
      button.disabled = false;
      load();
    });
    document.addEventListener("click", async (e) => {
      const b = e.target.closest("button.remove-account");
      if (!b) return;
      e.preventDefault();
      if (!confirm(`Remove ${b.dataset.account}? It can no longer log in to the broker or this view.`)) return;
      b.disabled = true;
      try { const done = await api("/api/accounts/remove", { name: b.dataset.account }); show(notice, `${done.account} removed. ${done.message}`); show(error, ""); }
      catch (err) { show(error, err.message); b.disabled = false; }
      load();
    });
    load();
  }

  return { overview, machinePage, accountsPage, badge, time, when, axisRange };

})();
// The page names its entry on the script tag (no inline script: the CSP forbids them).
{
  const entry = document.currentScript && document.currentScript.dataset.entry;
  if (entry === "overview" || entry === "machinePage" || entry === "accountsPage") FW[entry]();
}
