// pydra-actors dashboard: polls the master's snapshot once a second and draws it.
// Everything the master sends is shown with textContent or SVG attributes, never as HTML:
// task names and output come from users' code.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const token = new URLSearchParams(location.search).get("token");
let polling = false;

function api(path) {
  // The first load set a cookie; the token rides along too, for browsers that refuse it.
  const url = token ? `${path}?token=${encodeURIComponent(token)}` : path;
  return fetch(url, { cache: "no-store", credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    return r.json();
  });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function hue(id) {
  let h = 0;
  for (let i = 0; i < id.length; i++) h = (h * 31 + id.charCodeAt(i)) >>> 0;
  return 30 + (h % 300); // never red: a red bar is a failed run
}

function clock(epoch) {
  if (!epoch) return "";
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function seconds(s) {
  if (s < 60) return `${s.toFixed(1)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function short(id) {
  return id.length > 12 ? id.slice(0, 8) + "\u2026" : id;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state);
}

function progressCell(task) {
  const cell = el("td", { class: "progress" });
  const full = task.status === "done" && !task.total; // a Task that reported no steps
  const bar = el("progress", {
    max: Math.max(task.total, 1), value: full ? 1 : task.total ? task.done : 0,
  });
  if (!task.total && task.status === "running") bar.removeAttribute("value"); // indeterminate
  cell.append(bar, task.total ? `${task.done}/${task.total}` : task.done ? `${task.done}` : "");
  return cell;
}

function taskLink(id, text) {
  return el("a", { href: `#task/${encodeURIComponent(id)}` }, text);
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: columns }, empty))]));
}

function setLive(ok, text) {
  const live = document.getElementById("live");
  live.className = ok ? "live" : "live off";
  live.textContent = text;
}

// --- the overview ----------------------------------------------------------------

function drawSummary(s) {
  const t = s.counts.tasks;
  const cards = [
    ["nodes", s.counts.nodes],
    ["workers", `${s.counts.workers} (${s.counts.busy} busy)`],
    ["running", t.running || 0], ["queued", t.queued || 0], ["done", t.done || 0],
    ["erred", t.erred || 0], ["cancelled", t.cancelled || 0],
    ["units done", s.counts.units_done], ["units queued", s.counts.queued_units],
  ];
  document.getElementById("summary").replaceChildren(...cards.map(([label, value]) =>
    el("div", { class: "card", "data-card": label }, el("b", {}, value), el("span", {}, label))));
  showMaster(s);
}

let masterShown = false; // the header names the master once it is known (any page)

function showMaster(s) {
  const m = s.master;
  document.getElementById("master").textContent =
    `master ${m.id} at ${m.address} \u00b7 v${m.version} \u00b7 epoch ${m.epoch} \u00b7 up ` +
    seconds(s.now - m.started);
  masterShown = true;
}

function drawWorkers(s) {
  const rows = [];
  for (const node of s.nodes) {
    for (const w of node.workers) {
      rows.push(el("tr", { class: "worker", "data-worker": w.id, "data-state": w.state },
        el("td", { class: "mono", title: w.id }, w.id),
        el("td", {}, node.host || node.id),
        el("td", {}, badge(w.state)),
        el("td", {}, w.task ? taskLink(w.task, `${w.task_name}${w.driver ? " (driver)" : ""}`) : ""),
        el("td", {}, w.in_flight || ""),
        el("td", { class: "package mono" }, w.package || ""),
        el("td", { class: "cpu" }, w.cpu == null ? "" : `${Math.round(w.cpu)} %`),
        el("td", { class: "rss", "data-rss": w.rss == null ? "" : w.rss },
          w.rss == null ? "" : `${Math.round(w.rss / 1048576)} MiB`)));
    }
  }
  fill(document.querySelector("#workers tbody"), rows, "no workers: start a node", 8);
}

function drawTasks(s) {
  const rows = s.tasks.map((t) => el("tr", {
    class: "task", "data-task": t.id, "data-status": t.status, "data-done": t.done,
    "data-total": t.total,
  },
  el("td", {}, badge(t.status)),
  el("td", { title: t.name }, taskLink(t.id, t.name)),
  el("td", { class: "mono", title: t.id }, short(t.id)),
  el("td", { class: "mono", title: t.client }, short(t.client)),
  el("td", {}, t.priority),
  progressCell(t),
  el("td", {}, clock(t.submitted)),
  el("td", {}, t.started ? seconds((t.ended || s.now) - t.started) : "")));
  fill(document.querySelector("#tasks tbody"), rows, "no tasks yet", 8);
  const all = Object.values(s.counts.tasks).reduce((a, b) => a + b, 0);
  document.getElementById("tasks-note").textContent = all > s.tasks.length
    ? `(${s.tasks.length} of ${all} shown: every unfinished one first, then the newest finished)`
    : "";
}

function drawThroughput(s) {
  const chart = document.getElementById("throughput");
  const width = chart.clientWidth || 600, height = 170, left = 44, right = 44, bottom = 18;
  const points = s.throughput;
  // The x axis grows with the samples kept (a young master's first minute fills the chart).
  const span = Math.max(60, Math.ceil((points.length ? -points[0][0] : 0) / 60) * 60);
  const x = (t) => left + (width - left - right) * (1 + t / span);
  const parts = [];
  for (let t = -span; t <= 0; t += span / (span > 60 ? span / 60 : 4)) {
    parts.push(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: 4, y2: height - bottom }));
    parts.push(svg("text", { x: x(t), y: height - 4, "text-anchor": t ? "middle" : "end" },
      t ? `${t}s` : "now"));
  }
  for (const [index, name] of [[1, "units"], [2, "tasks"]]) {
    const top = Math.max(1, ...points.map((p) => p[index]));
    const y = (v) => height - bottom - (height - bottom - 8) * (v / top);
    if (points.length > 1) {
      parts.push(svg("polyline", {
        class: name, points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[index]).toFixed(1)}`).join(" "),
      }));
    }
    parts.push(svg("text", {
      x: index === 1 ? left - 4 : width - right + 4, y: 12,
      "text-anchor": index === 1 ? "end" : "start", class: `${name}-max`,
    }, top >= 100 ? Math.round(top) : top.toFixed(1)));
    const now = points.length ? points[points.length - 1][index] : 0;
    document.getElementById(`${name}-rate`).textContent = `${name}/s ${now}`;
  }
  if (points.length < 2) {
    parts.push(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" },
      "a point a second, from the master's start"));
  }
  chart.replaceChildren(...parts);
}

function drawStream(s) {
  const chart = document.getElementById("stream");
  const bars = s.stream.bars;
  // Zoomed to what there is (at least 10 s, at most the window the master keeps).
  const oldest = Math.min(0, ...bars.map((b) => b[2]));
  const span = Math.min(s.stream.window, Math.max(10, Math.ceil(-oldest / 5) * 5));
  const workers = s.nodes.flatMap((n) => n.workers.map((w) => w.id));
  for (const b of bars) if (!workers.includes(b[0])) workers.push(b[0]);
  const row = 16, top = 4, label = 190, bottom = 16;
  const width = chart.clientWidth || 1000;
  const height = top + Math.max(1, workers.length) * row + bottom;
  chart.setAttribute("height", height);
  const x = (t) => label + (width - label - 8) * (1 + Math.max(t, -span) / span);
  const names = Object.fromEntries(s.tasks.map((t) => [t.id, t.name]));
  const parts = [];
  const step = [1, 2, 5, 10, 15, 30].find((v) => span / v <= 6) || 60;
  for (let t = -Math.floor(span / step) * step; t <= 0; t += step) {
    parts.push(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: height - bottom }));
    parts.push(svg("text", { x: x(t), y: height - 4, "text-anchor": t ? "middle" : "end" },
      t ? `${t}s` : "now"));
  }
  workers.forEach((w, i) => {
    parts.push(svg("text", { x: label - 6, y: top + i * row + 11, "text-anchor": "end" },
      w.length > 30 ? "\u2026" + w.slice(-29) : w));
  });
  for (const [worker, task, start, end, units, ok] of bars) {
    const i = workers.indexOf(worker);
    const x0 = x(start), x1 = x(end);
    const rect = svg("rect", {
      x: x0.toFixed(1), y: top + i * row + 2, height: row - 4,
      width: Math.max(1.5, x1 - x0).toFixed(1), rx: 2, class: end ? "bar" : "bar open",
      "data-task": task, fill: ok ? `hsl(${hue(task)}, 62%, 52%)` : "#d64545",
    });
    rect.append(svg("title", {}, `${names[task] || task} \u00b7 ${units} unit${units === 1 ? "" : "s"}` +
      ` \u00b7 ${end ? (end - start).toFixed(3) + "s" : "running"}${ok ? "" : " \u00b7 failed"}`));
    parts.push(rect);
  }
  if (!workers.length) {
    parts.push(svg("text", { x: width / 2, y: top + 11, "text-anchor": "middle" }, "no workers"));
  }
  chart.replaceChildren(...parts);
}

function drawOverview(s) {
  drawSummary(s);
  drawWorkers(s);
  drawTasks(s);
  drawThroughput(s);
  drawStream(s);
}

// --- one task's page ---------------------------------------------------------------

function drawTask(d) {
  const title = document.getElementById("task-title");
  const facts = document.querySelector("#task-facts tbody");
  if (d.error) {
    title.textContent = d.id;
    facts.replaceChildren(el("tr", {}, el("td", { class: "empty" }, d.error)));
    document.querySelector("#story tbody").replaceChildren();
    document.getElementById("output").textContent = "";
    return;
  }
  const t = d.task;
  title.replaceChildren(`${t.name} `, badge(t.status));
  const pairs = [["id", t.id], ["client", t.client], ["kind", t.kind], ["priority", t.priority],
    ["submitted", clock(t.submitted)], ["started", clock(t.started)], ["ended", clock(t.ended)],
    ["workers now", t.workers]];
  const progress = el("tr", { class: "task", "data-task": t.id, "data-status": t.status,
    "data-done": t.done, "data-total": t.total }, el("th", {}, "progress"), progressCell(t));
  facts.replaceChildren(progress, ...pairs.map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", { class: "mono" }, v))));
  fill(document.querySelector("#story tbody"), d.story.slice().reverse().map(([key, a, b, cause, when]) =>
    el("tr", {}, el("td", { class: "mono" }, clock(when)), el("td", { class: "mono" }, key),
      el("td", {}, a), el("td", {}, b), el("td", { title: cause }, cause))), "no story", 5);
  const out = document.getElementById("output");
  const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
  out.textContent = d.output.map(([worker, stream, unit, text, when]) =>
    `${clock(when)} ${worker} ${stream}${unit >= 0 ? " unit " + unit : ""}: ${text}`).join("\n")
    || "(no output)";
  if (atBottom) out.scrollTop = out.scrollHeight;
  document.getElementById("output-note").textContent = d.dropped
    ? `(the last ${d.output.length} lines; ${d.dropped} more not kept)` : "";
}

// --- polling -------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#task\/(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

async function poll() {
  if (polling) return; // a slow answer: skip a beat rather than pile requests up
  polling = true;
  const taskId = route();
  document.getElementById("overview").hidden = taskId !== null;
  document.getElementById("task-page").hidden = taskId === null;
  try {
    if (taskId !== null) {
      drawTask(await api(`/api/task/${encodeURIComponent(taskId)}`));
      if (!masterShown) showMaster(await api("/api/state")); // opened at a task: once
    } else {
      drawOverview(await api("/api/state"));
    }
    setLive(true, "live");
  } catch (err) {
    setLive(false, `no answer: ${err.message}`);
  } finally {
    polling = false;
  }
}

window.addEventListener("hashchange", poll);
poll();
setInterval(poll, POLL_MS);
