// The dashboard: a client of the HTTP API like any other. The API key lives in this tab's
// sessionStorage and travels only in the Authorization header (never in a URL), so the live
// event stream is read with fetch() rather than EventSource, which cannot send headers.
"use strict";

const KEY = "warp-api-key";
const ACTIVE = new Set(["queued", "running", "pausing", "paused", "cancelling"]);
const VIEWS = ["sign-in", "jobs", "job", "comparison", "submit"];
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let stopView = () => {};

class Unauthorized extends Error {}

function apiKey() {
  return sessionStorage.getItem(KEY);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    signOut("The server refused this key: sign in again.");
    throw new Unauthorized();
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function show(view) {
  for (const id of VIEWS) $(id).hidden = id !== view;
  $("nav").hidden = view === "sign-in";
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  stopView();
  $("sign-in-error").textContent = message;
  show("sign-in");
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  try {
    await json("/v1/jobs?limit=1");
  } catch (error) {
    if (!(error instanceof Unauthorized)) $("sign-in-error").textContent = error.message;
    return;
  }
  $("sign-in-error").textContent = "";
  route();
}

function route() {
  stopView();
  stopView = () => {};
  if (!apiKey()) return show("sign-in");
  const hash = location.hash;
  const job = hash.match(/^#\/jobs\/([0-9a-zA-Z_-]+)$/);
  const compared = hash.match(/^#\/compare\/([0-9a-zA-Z_,-]+)$/);
  if (job) showJob(job[1]);
  else if (compared) showComparison(compared[1].split(","));
  else if (hash === "#/submit") showSubmit();
  else showJobs();
}

// Runs `task` now and then every `ms` until the returned function is called.
function every(ms, task) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      await task();
    } catch (error) {
      if (error instanceof Unauthorized) return;
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function element(tag, text = "", className = "") {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

// -- the job list --------------------------------------------------------------------------

function showJobs() {
  show("jobs");
  const selected = new Set();
  const compare = $("compare");
  const choose = (id, on) => {
    if (on) selected.add(id);
    else selected.delete(id);
    compare.disabled = selected.size < 2 || selected.size > 8;
  };
  compare.disabled = true;
  compare.onclick = () => (location.hash = `#/compare/${[...selected].join(",")}`);
  stopView = every(2000, async () => {
    const page = await json("/v1/jobs?limit=100");
    $("no-jobs").hidden = page.data.length > 0;
    $("job-rows").replaceChildren(...page.data.map((job) => jobRow(job, selected, choose)));
  });
}

function jobRow(job, selected, choose) {
  const row = element("tr");
  row.dataset.id = job.id;
  row.dataset.status = job.status;
  const box = element("input");
  box.type = "checkbox";
  box.checked = selected.has(job.id);
  box.onchange = () => choose(job.id, box.checked);
  const pick = element("td");
  pick.append(box);
  row.append(pick);
  const link = element("a", job.id.slice(0, 12));
  link.href = `#/jobs/${job.id}`;
  const id = element("td");
  id.append(link);
  const bar = element("progress");
  bar.max = 1;
  bar.value = job.progress.fraction;
  const progress = element("td");
  progress.append(bar, ` ${Math.round(job.progress.fraction * 100)}%`);
  row.append(
    id,
    element("td", job.spec.method),
    element("td", job.status, `status ${job.status}`),
    element("td", job.phase || ""),
    progress,
    element("td", new Date(job.created_at).toLocaleString()),
  );
  return row;
}

// -- one job -------------------------------------------------------------------------------

function showJob(id) {
  show("job");
  $("job-id").textContent = id;
  for (const list of ["events", "artifacts", "metrics", "loss-chart"]) $(list).replaceChildren();
  $("report-plot").hidden = true;
  $("job-error").textContent = "";
  const state = { id, etag: null, job: null, points: [], artifacts: false };
  const stopPolling = every(2000, () => poll(state));
  const stream = new AbortController();
  follow(state, stream.signal).catch(() => {});
  $("cancel").onclick = async () => {
    await json(`/v1/jobs/${id}/cancel`, { method: "POST" });
    state.etag = null;
  };
  stopView = () => {
    stopPolling();
    stream.abort();
  };
}

// The job's status: a 304 (same ETag) costs the server no serialization and us no work.
async function poll(state) {
  const headers = state.etag ? { "If-None-Match": state.etag } : {};
  const response = await api(`/v1/jobs/${state.id}`, { headers });
  if (response.status === 304) return;
  const body = await response.json();
  if (!response.ok) {
    $("job-error").textContent = body.error.message;
    return;
  }
  state.etag = response.headers.get("ETag");
  state.job = body;
  renderJob(state);
}

function renderJob(state) {
  const job = state.job;
  const status = $("job-status");
  status.textContent = job.status;
  status.className = `status ${job.status}`;
  $("job-phase").textContent = job.phase ? `phase: ${job.phase}` : "";
  $("job-progress").value = job.progress.fraction;
  $("job-step").textContent = job.progress.total_steps
    ? `step ${job.progress.step} / ${job.progress.total_steps}`
    : "";
  $("cancel").hidden = !ACTIVE.has(job.status);
  $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  renderMetrics(job.metrics);
  if (!ACTIVE.has(job.status) && !state.artifacts) {
    state.artifacts = true;
    loadArtifacts(state.id).catch(() => (state.artifacts = false));
  }
}

function renderMetrics(metrics) {
  const table = $("metrics");
  if (!metrics || !metrics.after) return table.replaceChildren();
  const before = metrics.before || {};
  const rows = Object.keys(metrics.after).map((name) => {
    const row = element("tr");
    row.append(element("th", name));
    for (const value of [before[name], metrics.after[name]]) {
      row.append(element("td", value === undefined ? "-" : value.toFixed(3), "num"));
    }
    return row;
  });
  const head = element("tr");
  head.append(element("th", "metric"), element("th", "before"), element("th", "after"));
  table.replaceChildren(head, ...rows);
}

// The live events: Server-Sent Events read from a fetch() body. The stream ends when the job
// has finished; if it drops earlier, it is opened again after the last event seen.
async function follow(state, signal) {
  let after = 0;
  while (!signal.aborted) {
    const response = await api(`/v1/jobs/${state.id}/events/stream?after=${after}`, { signal });
    if (!response.ok) return;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (let end = buffer.search(/\r?\n\r?\n/); end >= 0; end = buffer.search(/\r?\n\r?\n/)) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue; // a keep-alive comment
        const event = JSON.parse(data);
        after = event.seq;
        onEvent(state, event);
      }
    }
    if (state.job && !ACTIVE.has(state.job.status)) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function onEvent(state, event) {
  const data = event.data;
  const figures = Object.entries(data)
    .filter(([, value]) => typeof value !== "object")
    .map(([name, value]) => `${name}=${typeof value === "number" ? +value.toPrecision(4) : value}`)
    .join(" ");
  const item = element("li", `#${event.seq} ${event.kind} ${event.phase || ""} ${figures}`);
  $("events").append(item);
  if (event.kind === "metrics") {
    state.points.push({ step: data.step, train: data.train_loss, valid: data.valid_loss });
    drawChart(state.points);
  }
  if (["finished", "phase_finished"].includes(event.kind)) state.etag = null;
}

// Training (solid) and validation (dashed) loss against the optimizer step, as SVG.
function drawChart(points) {
  const svg = $("loss-chart");
  const [width, height, pad] = [600, 220, 36];
  const values = points.flatMap((p) => [p.train, p.valid]).filter((v) => v !== undefined);
  const steps = points.map((p) => p.step);
  const [low, high] = [Math.min(...values), Math.max(...values)];
  const [first, last] = [Math.min(...steps), Math.max(...steps)];
  const x = (step) => pad + ((step - first) / Math.max(last - first, 1)) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - low) / Math.max(high - low, 1e-9)) * (height - 2 * pad);
  const line = (key, className) => {
    const path = points.filter((p) => p[key] !== undefined).map((p) => `${x(p.step)},${y(p[key])}`);
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", path.join(" "));
    polyline.setAttribute("class", className);
    return polyline;
  };
  const label = (text, lx, ly) => {
    const node = document.createElementNS(SVG, "text");
    node.setAttribute("x", lx);
    node.setAttribute("y", ly);
    node.textContent = text;
    return node;
  };
  svg.replaceChildren(
    line("train", "train"),
    line("valid", "valid"),
    label(high.toFixed(3), 2, pad),
    label(low.toFixed(3), 2, height - pad),
    label(`step ${first}`, pad, height - 8),
    label(`step ${last}`, width - pad - 40, height - 8),
  );
  svg.dataset.points = points.length;
  svg.dataset.lastStep = last;
}

// -- several jobs side by side: the table and plot of `warp compare` ----------------------

async function showComparison(ids) {
  show("comparison");
  for (const id of ["comparison-table", "verdicts", "tradeoff"]) $(id).replaceChildren();
  $("comparison-error").textContent = "";
  const query = ids.map((id) => `ids=${encodeURIComponent(id)}`).join("&");
  let result;
  try {
    result = await json(`/v1/compare?${query}`);
  } catch (error) {
    $("comparison-error").textContent = error.message;
    return;
  }
  renderMarkdownTable(result.markdown);
  $("refusal-rule").textContent = result.refusal_rule ? `Refusals judged by: ${result.refusal_rule}` : "";
  drawTradeoff(result.labels, result.jobs.map((job) => job.metrics || {}));
}

// The API's Markdown table (one source for its columns), shown as an HTML table; the lines
// after it are the verdicts against plain fine-tuning.
function renderMarkdownTable(markdown) {
  const lines = markdown.split("\n");
  const cells = (line) => line.slice(1, -1).split(" | ").map((cell) => cell.trim());
  const rows = lines.filter((line) => line.startsWith("|") && !line.startsWith("| ---"));
  $("comparison-table").replaceChildren(
    ...rows.map((line, index) => {
      const row = element("tr");
      for (const text of cells(line)) row.append(element(index === 0 ? "th" : "td", text));
      return row;
    }),
  );
  const verdicts = lines.filter((line) => line.startsWith("- ")).map((line) => line.slice(2));
  $("verdicts").replaceChildren(...verdicts.map((text) => element("li", text)));
}

// Refusal rate against utility loss: an arrow per job from before (hollow) to after (filled).
function drawTradeoff(labels, metrics) {
  const svg = $("tradeoff");
  const [width, height, pad] = [600, 320, 44];
  const done = metrics.map((m, i) => [labels[i], m, COLORS[i % COLORS.length]]).filter(([, m]) => m.before && m.after);
  const losses = done.flatMap(([, m]) => [m.before.utility_loss, m.after.utility_loss]);
  const [low, high] = [Math.min(...losses), Math.max(...losses)];
  const x = (loss) => pad + ((loss - low) / Math.max(high - low, 1e-9)) * (width - 2 * pad);
  const y = (rate) => height - pad - rate * (height - 2 * pad);
  const node = (tag, attributes, text = "") => {
    const made = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
    made.textContent = text;
    return made;
  };
  const parts = [
    node("text", { x: 4, y: pad }, "refusal 1.0"),
    node("text", { x: 4, y: height - pad }, "refusal 0.0"),
    node("text", { x: pad, y: height - 8 }, `utility loss ${low.toFixed(3)}`),
    node("text", { x: width - pad - 110, y: height - 8 }, `${high.toFixed(3)}`),
  ];
  done.forEach(([label, m, color], index) => {
    const [x0, y0] = [x(m.before.utility_loss), y(m.before.refusal_rate)];
    const [x1, y1] = [x(m.after.utility_loss), y(m.after.refusal_rate)];
    const arrow = node("g", { class: "arrow", "data-label": label });
    arrow.append(
      node("line", { x1: x0, y1: y0, x2: x1, y2: y1, stroke: color, "stroke-width": 2 }),
      node("circle", { cx: x0, cy: y0, r: 5, fill: "none", stroke: color }),
      node("circle", { cx: x1, cy: y1, r: 5, fill: color }),
      node("text", { x: width - 190, y: 16 + 14 * index, style: `fill: ${color}` }, `● ${label}`),
    );
    parts.push(arrow);
  });
  svg.replaceChildren(...parts);
}

// -- submitting a job ----------------------------------------------------------------------

function showSubmit() {
  show("submit");
  $("spec-errors").replaceChildren();
  $("submit-form").onsubmit = async (event) => {
    event.preventDefault();
    let spec;
    try {
      spec = JSON.parse($("spec").value);
    } catch (error) {
      $("spec-errors").replaceChildren(element("li", `not JSON: ${error.message}`));
      return;
    }
    const response = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(spec),
    });
    const body = await response.json();
    if (response.ok) {
      location.hash = `#/jobs/${body.id}`;
      return;
    }
    const fields = body.error.fields || [{ field: body.error.param || "", reason: body.error.message }];
    $("spec-errors").replaceChildren(
      ...fields.map((f) => element("li", f.field ? `${f.field}: ${f.reason}` : f.reason)),
    );
  };
}

async function loadArtifacts(id) {
  const page = await json(`/v1/jobs/${id}/artifacts`);
  $("artifacts").replaceChildren(
    ...page.data.map((artifact) => {
      const button = element("button", `${artifact.name} (${artifact.size.toLocaleString()} bytes)`);
      button.type = "button";
      button.dataset.name = artifact.name;
      button.onclick = () => download(id, artifact.name);
      const item = element("li");
      item.append(button);
      return item;
    }),
  );
  if (page.data.some((artifact) => artifact.name === "report.png")) {
    $("report-plot").src = URL.createObjectURL(await blob(id, "report.png"));
    $("report-plot").hidden = false;
  }
}

async function blob(id, name) {
  const response = await api(`/v1/jobs/${id}/artifacts/${encodeURI(name)}`);
  if (!response.ok) throw new Error(`${name}: ${response.statusText}`);
  return response.blob();
}

// A download needs the Authorization header, so the file is fetched, then saved from memory.
async function download(id, name) {
  const link = element("a");
  link.href = URL.createObjectURL(await blob(id, name));
  link.download = name.split("/").pop();
  document.body.append(link);
  link.click();
  link.remove();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
