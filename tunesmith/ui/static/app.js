// tunesmith ui: one page, four views (runs, one run, new run, compare & chat), routed by the URL's hash.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $("#view");
let cleanup = [];  // what the current view must close when another opens (event streams, charts)
window.tunesmith = { latencies: [], charts: {} };  // read by the browser test: ms from a metric line to its point

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function h(html) { const t = document.createElement("template"); t.innerHTML = html.trim(); return t.content.firstElementChild; }
function fmt(x, digits = 4) { return x === null || x === undefined ? "–" : Number(x).toPrecision(digits); }
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
function badge(status) { return `<span class="badge ${esc(status)}">${esc(status)}</span>`; }
function toast(text) {
  const el = h(`<div class="toast">${esc(text)}</div>`);
  document.body.appendChild(el);
  setTimeout(() => el.remove(), 6000);
}
async function api(path, body) {
  const res = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok && data.error) throw new Error(data.error);
  return data;
}
function stream(path, handlers) {
  const source = new EventSource(path);
  for (const [name, fn] of Object.entries(handlers)) source.addEventListener(name, e => fn(JSON.parse(e.data)));
  cleanup.push(() => source.close());
  return source;
}
function progress(row) {
  const total = row.total_steps;
  const share = total ? Math.min(100, 100 * row.step / total) : 0;
  return `${row.step}${total ? " / " + total : ""}<div class="bar"><div style="width:${share}%"></div></div>`;
}

// ---------------------------------------------------------------- runs table

function showRuns() {
  view().innerHTML = `
    <h1>Runs</h1>
    <p class="lead">Every run folder in <code id="root"></code>, updated live. Click a run to watch its curves,
      stop or resume it, and read its base-vs-tuned report. <a href="#/new">Start a new run</a>.</p>
    <table id="runs"><thead><tr><th>Run</th><th>Method</th><th>Model</th><th>Status</th><th>Steps</th>
      <th>Last loss</th><th>Wall time</th><th>Report: base → tuned</th></tr></thead><tbody></tbody></table>`;
  const fill = data => {
    $("#root").textContent = data.root;
    const body = $("#runs tbody");
    if (!data.runs.length) {
      body.innerHTML = `<tr><td colspan="8" class="empty">No runs yet. <a href="#/new">Start one</a>, or run
        <code>tunesmith train ... output_dir=${esc(data.root)}/NAME</code> in a terminal.</td></tr>`;
      return;
    }
    body.innerHTML = data.runs.map(r => `
      <tr class="run" data-run="${esc(r.name)}">
        <td><a href="#/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a></td>
        <td>${esc(r.method || "–")}</td><td class="small">${esc(r.model || "–")}</td>
        <td>${badge(r.status)}${r.status === "finished" ? "" : `<div class="small ${r.status === "failed" ? "err" : ""}">${esc(shorten(r.detail, 160))}</div>`}</td>
        <td class="num">${progress(r)}</td><td class="num">${fmt(r.last_loss)}</td>
        <td class="num">${duration(r.wall_s)}</td>
        <td class="small">${r.headline.length ? esc(r.headline.join(" ")) : (r.status === "finished" ? "no report" : "–")}</td>
      </tr>`).join("");
    body.querySelectorAll("tr.run").forEach(tr => tr.onclick = () => location.hash = `#/run/${encodeURIComponent(tr.dataset.run)}`);
  };
  api("/api/runs").then(fill);
  stream("/api/events/runs", { message: fill });
}
function shorten(text, n) { text = String(text || ""); return text.length > n ? text.slice(0, n) + "…" : text; }

// ---------------------------------------------------------------- one run

const CHARTS = [
  { id: "loss", title: "Loss (train, and eval at its steps)", series: [["loss", "train loss", "#2f5fd0"], ["eval_loss", "eval loss", "#d35400"]] },
  { id: "lr", title: "Learning rate", series: [["lr", "learning rate", "#16a085"]] },
  { id: "tps", title: "Tokens per second", series: [["tokens_per_s", "tokens/s", "#8e44ad"]] },
  { id: "reward", title: "Reward (RL)", rl: true, series: [["reward", "mean reward", "#1f8a4c"], ["eval_reward", "eval reward", "#d35400"]] },
  { id: "kl", title: "KL to the reference (RL)", rl: true, series: [["kl", "KL per token", "#c0392b"]] },
];

function axisText(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4) return Math.round(v).toLocaleString("en");
  if (a >= 0.01) return String(+v.toPrecision(3));
  return v.toExponential(1);
}

function makeChart(el, spec) {
  const width = Math.max(300, el.clientWidth - 4);
  const opts = {
    width, height: 220, legend: { live: false },
    scales: { x: { time: false }, y: { range: (u, min, max) => min === max  // a flat series (a reward of 0 so far) still shows
      ? [min - (Math.abs(min) || 1) * 0.5, max + (Math.abs(max) || 1) * 0.5] : uPlot.rangeNum(min, max, 0.1, true) } },
    axes: [{ label: "step" }, { size: 64, values: (u, ticks) => ticks.map(axisText) }],
    series: [{ label: "step" }, ...spec.series.map(([key, label, color]) => ({
      label, stroke: color, width: 2, spanGaps: true,
      points: { show: key.startsWith("eval"), size: 6, fill: color },
    }))],
  };
  const data = [[], ...spec.series.map(() => [])];
  const plot = new uPlot(opts, data, el);
  return { plot, data, spec, el };
}

function showRun(name) {
  view().innerHTML = `
    <div class="row"><h1 id="run-name"></h1><span id="run-badge"></span>
      <span style="margin-left:auto"></span>
      <button class="danger" id="stop" disabled>Stop</button>
      <button class="primary" id="resume" disabled>Resume</button></div>
    <p class="lead" id="run-detail"></p>
    <div class="card"><div class="row"><strong id="run-steps"></strong><span id="run-eta" class="small"></span>
      <span id="run-meta" class="small" style="margin-left:auto"></span></div>
      <div class="bar big"><div id="run-bar" style="width:0%"></div></div></div>
    <div class="grid" id="charts"></div>
    <div id="samples"></div>
    <h2>Report: base vs tuned</h2><div id="report" class="card small">The report appears here once the run has
      evaluated the tuned model against its base on held-out rows (<code>data.test</code>, or sft's <code>data.eval</code>), or a pretrain run against its base on held-out text.</div>
    <h2>Resolved config</h2><pre id="config" class="config">–</pre>
    <div id="log"></div>`;
  $("#run-name").textContent = name;
  const charts = {};
  let rl = false;
  const ensureCharts = () => {
    for (const spec of CHARTS) {
      if (charts[spec.id] || (spec.rl && !rl)) continue;
      const box = h(`<div class="card chart"><h3>${esc(spec.title)} <span class="small nodata">· no values logged yet</span></h3><div class="plot" data-chart="${spec.id}" data-points="0"></div></div>`);
      $("#charts").appendChild(box);
      charts[spec.id] = makeChart($(".plot", box), spec);
    }
    window.tunesmith.charts = charts;
  };
  ensureCharts();
  cleanup.push(() => { for (const c of Object.values(charts)) c.plot.destroy(); });

  let shown = {}, batches = 0;
  const addRecords = records => {
    const live = batches++ > 0;  // the first batch holds the lines written before the page connected
    if (!rl && records.some(r => "reward" in r || "kl" in r)) { rl = true; ensureCharts(); }
    const written = [];
    for (const rec of records) {
      if (rec.time && live) written.push(rec.time * 1000);
      for (const c of Object.values(charts)) {
        const keys = c.spec.series.map(s => s[0]);
        if (!keys.some(k => typeof rec[k] === "number")) continue;
        c.data[0].push(rec.step);
        keys.forEach((k, i) => c.data[i + 1].push(typeof rec[k] === "number" ? rec[k] : null));
      }
    }
    const last = records.filter(r => "lr" in r).pop();  // a training step's line (eval lines have no lr)
    if (last) {  // the step counter moves with the curve; the status stream adds the ETA
      const total = shown.total_steps;
      $("#run-steps").textContent = `step ${last.step}${total ? " of " + total : ""}`;
      if (total) $("#run-bar").style.width = `${Math.min(100, 100 * last.step / total)}%`;
    }
    for (const c of Object.values(charts)) {
      c.plot.setData(c.data);
      c.el.dataset.points = String(c.data[0].length);
      c.el.parentElement.querySelector(".nodata").hidden = c.data[0].length > 0;
    }
    // the points are on screen at the next frame: that is when a metric line has reached the chart
    requestAnimationFrame(() => {
      const now = Date.now();
      for (const t of written) window.tunesmith.latencies.push(now - t);
    });
  };
  const reset = () => { batches = 0; for (const c of Object.values(charts)) { c.data.forEach(a => a.length = 0); c.plot.setData(c.data); c.el.dataset.points = "0"; } };

  const status = info => {
    shown = info;
    if (info.rl && !rl) { rl = true; ensureCharts(); }
    $("#run-badge").innerHTML = badge(info.status);
    $("#run-detail").innerHTML = `<span class="${info.status === "failed" ? "err" : ""}">${esc(info.detail)}</span>`;
    const total = info.total_steps;
    $("#run-steps").textContent = `step ${info.step}${total ? " of " + total : ""}`;
    $("#run-bar").style.width = total ? `${Math.min(100, 100 * info.step / total)}%` : "0%";
    $("#run-eta").textContent = info.status === "running" && info.eta_s !== null ? `about ${duration(info.eta_s)} left` : "";
    $("#run-meta").textContent = `${info.method || ""} · ${info.model || ""} · wall time ${duration(info.wall_s)}`
      + (info.last_loss !== null ? ` · last loss ${fmt(info.last_loss)}` : "");
    $("#stop").disabled = info.status !== "running";
    $("#resume").disabled = !(info.resumable && (info.status === "stopped" || info.status === "failed"));
    $("#resume").title = info.resume_command;
    if (info.config) $("#config").textContent = info.config;
    if (info.has_report && !$("#report iframe")) {
      $("#report").className = "";
      $("#report").innerHTML = (info.headline.length ? `<p><strong>${esc(info.headline.join(" "))}</strong></p>` : "")
        + `<p class="small"><a target="_blank" href="/api/runs/${encodeURIComponent(name)}/files/report/report.html">open the report on its own</a></p>`
        + `<iframe class="report" title="report" src="/api/runs/${encodeURIComponent(name)}/files/report/report.html"></iframe>`;
    }
    if (info.samples && info.samples.length) {
      $("#samples").innerHTML = `<h2>Latest sampled completions (step ${esc(info.samples[0].step)})</h2>
        <table><thead><tr><th>Prompt</th><th>Completion</th><th>Reward</th></tr></thead><tbody>${info.samples.map(s => `
          <tr><td class="small">${esc(typeof s.prompt === "string" ? s.prompt : JSON.stringify(s.prompt))}</td>
          <td><pre>${esc(s.completion)}</pre></td><td class="num">${fmt(s.reward, 3)}
          <div class="small">${esc(Object.entries(s.rewards || {}).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(", "))}</div></td></tr>`).join("")}
        </tbody></table>`;
    }
    if (info.log_tail && !$("#log details")) {
      $("#log").innerHTML = `<details ${info.status === "failed" ? "open" : ""}><summary><strong>Output of the train command</strong>
        <span class="small">(its log: ${esc(info.log)})</span></summary><pre></pre></details>`;
    }
    if (info.log_tail) {
      $("#log pre").textContent = info.log_tail;
      if (info.status === "failed") $("#log details").open = true;
    }
  };
  $("#stop").onclick = async () => {
    $("#stop").disabled = true;
    try { toast((await api(`/api/runs/${encodeURIComponent(name)}/stop`, {})).message); } catch (e) { toast(e.message); }
  };
  $("#resume").onclick = async () => {
    $("#resume").disabled = true;
    try { toast(`resuming: ${(await api(`/api/runs/${encodeURIComponent(name)}/resume`, {})).command}`); } catch (e) { toast(e.message); }
  };
  const gone = info => { $("#run-detail").innerHTML = `<span class="err">${esc(info.error)}</span>`; };
  const source = stream(`/api/events/run/${encodeURIComponent(name)}`, { metrics: addRecords, status, reset, gone });
  source.addEventListener("gone", () => source.close());
  // each connection (a reconnect too) starts from the first line of metrics.jsonl: start the charts over with it
  source.addEventListener("open", reset);
  api(`/api/runs/${encodeURIComponent(name)}`).catch(e => { source.close(); gone({ error: e.message }); });
}

// ---------------------------------------------------------------- new run

let form = null;  // {schema, values}

async function showNew() {
  if (!form) {
    const schema = await api("/api/schema");
    form = { schema, values: { ...schema.values } };
  }
  const { schema, values } = form;
  view().innerHTML = `
    <h1>New run</h1>
    <p class="lead">Every setting of a run, with its meaning and default. Only the settings the chosen method reads
      are shown; change what you need, the rest keep their defaults. The run starts as its own
      <code>tunesmith train</code> process, so it goes on if you close this page.</p>
    <div class="form-wrap"><div id="sections"></div>
      <div class="side">
        <div class="card"><div class="row"><button class="primary" id="start">Start run</button>
          <span id="check-state" class="small"></span></div><div id="problems"></div></div>
        <div class="card"><h3 style="margin:0 0 6px;font-size:13px">The same run from a terminal</h3><pre id="cli"></pre>
          <h3 style="margin:10px 0 6px;font-size:13px">…or as a config file (<code>tunesmith train run.yaml</code>)</h3><pre id="yaml"></pre></div>
        <div class="card"><h3 style="margin:0 0 6px;font-size:13px">Data preview (<code>tunesmith data inspect</code>)</h3>
          <p class="small" style="margin:0 0 6px">The detected format, token counts, and one example with the tokens the
            loss trains on <mark>marked</mark>.</p>
          <button id="inspect">Preview data.train</button><div id="preview" style="margin-top:8px"></div></div>
      </div></div>`;
  const host = $("#sections");
  for (const section of schema.sections) {
    const open = ["top", "data", "train", "rl"].includes(section.name);
    const box = h(`<details class="section" data-section="${esc(section.name)}" ${open ? "open" : ""}>
      <summary>${section.name === "top" ? "Run" : esc(section.name)}<span class="small">${esc(section.doc)}</span></summary>
      <div class="fields"></div></details>`);
    for (const key of section.keys) {
      const id = `f-${key.key.replace(/\./g, "-")}`;
      const input = key.widget === "choice"
        ? `<select id="${id}" name="${esc(key.key)}">${key.choices.map(c => `<option value="${esc(c)}">${esc(key.key === "lora" ? (c === "null" ? "full fine-tuning (lora: null)" : "LoRA adapter") : c)}</option>`).join("")}</select>`
        : `<input id="${id}" name="${esc(key.key)}" spellcheck="false" autocomplete="off">`;
      const field = h(`<div class="field" data-key="${esc(key.key)}"><label for="${id}">${esc(key.key)}</label>${input}
        <div class="doc">${esc(key.doc)} <span class="default">(default: ${esc(key.key === "lora" ? "LoRA adapter" : key.default)}${key.widget === "text" ? "; " + esc(key.type) : ""})</span></div>
        <div class="msg"></div></div>`);
      field.dataset.methods = key.methods.join(",");
      $(".fields", box).appendChild(field);
      const el = $("input, select", field);
      el.value = values[key.key] ?? key.default;
      if (key.widget === "text" && key.default === "null") {
        el.placeholder = "null (not set)";
        if (el.value === "null") el.value = values[key.key] = "";
      }
      el.addEventListener("input", () => { values[key.key] = el.value; changed(); });
    }
    box.dataset.methods = section.methods.join(",");
    host.appendChild(box);
  }
  let timer = null;
  const changed = () => { applyVisibility(); clearTimeout(timer); timer = setTimeout(runCheck, 350); };
  const applyVisibility = () => {
    const method = values.method;
    const full = values.lora === "null";
    host.querySelectorAll("details.section").forEach(d => {
      const m = d.dataset.methods;
      d.hidden = (m && !m.split(",").includes(method)) || (full && d.dataset.section === "lora");
    });
    host.querySelectorAll(".field").forEach(f => {
      const m = f.dataset.methods;
      f.hidden = !!(m && !m.split(",").includes(method));
      const key = f.dataset.key;
      const def = schema.sections.flatMap(s => s.keys).find(k => k.key === key).default;
      const now = values[key] ?? def;
      f.classList.toggle("changed", now !== def && !(now === "" && def === "null"));
    });
  };
  const runCheck = async () => {
    $("#check-state").textContent = "checking…";
    const result = await api("/api/check", { values });
    showCheck(result);
    return result;
  };
  const showCheck = result => {
    host.querySelectorAll(".field").forEach(f => { f.classList.remove("bad"); $(".msg", f).textContent = ""; });
    const loose = [];
    for (const p of result.problems) {
      const f = p.field && host.querySelector(`.field[data-key="${CSS.escape(p.field)}"]`);
      if (f) {
        f.classList.add("bad");
        $(".msg", f).textContent += ($(".msg", f).textContent ? "\n" : "") + p.message;
        f.closest("details").open = true;
      } else loose.push(p.message);
    }
    $("#problems").innerHTML = result.problems.length
      ? `<p class="err"><strong>${result.problems.length} problem${result.problems.length > 1 ? "s" : ""}</strong>, shown beside ${result.problems.length > 1 ? "their fields" : "its field"}; fix ${result.problems.length > 1 ? "them" : "it"} to start.</p>`
        + loose.map(m => `<p class="err">${esc(m)}</p>`).join("")
      : "";
    $("#check-state").textContent = result.ok ? "ready to start" : "";
    $("#cli").textContent = result.cli;
    $("#yaml").textContent = result.yaml;
  };
  $("#start").onclick = async () => {
    $("#start").disabled = true;
    try {
      const res = await fetch("/api/start", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ values }) });
      const data = await res.json();
      if (res.ok) {
        form = null;  // the next new run starts from the defaults again, with a new folder name
        location.hash = `#/run/${encodeURIComponent(data.name)}`;
        return;
      }
      if (data.problems) showCheck(data); else toast(data.error || `HTTP ${res.status}`);
    } finally { if ($("#start")) $("#start").disabled = false; }
  };
  $("#inspect").onclick = async () => {
    $("#preview").innerHTML = `<p class="small">reading ${esc(values["data.train"])}…</p>`;
    try {
      const r = await api("/api/inspect", { path: values["data.train"], model: values.model,
        max_length: Number(values["train.max_length"]) || 1024, format: values["data.format"] });
      const text = esc(r.text).replace("inside [[ ]]", "highlighted").replace(/\[\[([\s\S]*?)\]\]/g, "<mark>$1</mark>");
      $("#preview").innerHTML = `<p class="small"><code>${esc(r.command)}</code></p><pre id="preview-text">${text}</pre>`;
    } catch (e) { $("#preview").innerHTML = `<p class="err">${esc(e.message)}</p>`; }
  };
  applyVisibility();
  runCheck();
}

// ---------------------------------------------------------------- compare and chat

async function showChat() {
  view().innerHTML = `
    <h1>Compare &amp; chat</h1>
    <p class="lead">Pick two or more models: finished runs (the tuned model), the base a run started from, a hub id,
      a model folder or a <code>.gguf</code> file. Send one prompt and read their answers side by side as they stream,
      or score them all on a data file with <code>tunesmith compare</code>.</p>
    <div class="form-wrap"><div>
      <div class="card"><h3 style="margin:0 0 6px;font-size:13px">Prompt</h3>
        <textarea id="prompt" rows="3" placeholder="Ask something the tuned model should now do well"></textarea>
        <div class="row" style="margin-top:8px"><button class="primary" id="send">Send to every model</button>
          <label class="small">max tokens <input id="max-tokens" value="64" size="4"></label>
          <label class="small">temperature <input id="temperature" value="0" size="4"></label>
          <span id="chat-state" class="small"></span></div></div>
      <div class="answers" id="answers"></div>
      <h2>Score them on a data file</h2>
      <div class="card"><div class="row"><input class="wide" id="cmp-data" placeholder="data file with prompts and reference answers (.jsonl, .csv, ...)" style="flex:1">
        <label class="small">rows <input id="cmp-limit" value="20" size="4"></label>
        <button id="compare">Run tunesmith compare</button></div>
        <div class="row" style="margin-top:8px"><input class="wide" id="cmp-text" placeholder="optional: held-out plain text of your domain (field text, or .txt) for its perplexity" style="flex:1">
          <label class="small"><input type="checkbox" id="cmp-chain"> stages in order (each against the one before)</label></div>
        <p class="small">The first model in the list that is ticked is the base the others are compared with. The comparison runs as its
          own process; its report opens below when written.</p><div id="jobs"></div></div>
    </div><div class="side"><div class="card"><h3 style="margin:0 0 6px;font-size:13px">Models</h3>
      <div class="choices" id="choices"><p class="small">loading…</p></div>
      <input class="wide" id="other" placeholder="another model: hub id, folder, .gguf or default" style="margin-top:8px">
    </div></div></div>`;
  const { choices } = await api("/api/choices");
  $("#choices").innerHTML = choices.length
    ? choices.map((c, i) => `<label><input type="checkbox" value="${esc(c.id)}" ${i < 2 ? "checked" : ""}> ${esc(c.label)}</label>`).join("")
    : `<p class="small">No finished runs yet; name a model below.</p>`;
  const picked = () => [...document.querySelectorAll("#choices input:checked")].map(i => i.value)
    .concat($("#other").value.trim() ? [$("#other").value.trim()] : []);
  $("#send").onclick = async () => {
    const models = picked();
    const prompt = $("#prompt").value.trim();
    if (!models.length || !prompt) { toast("pick at least one model and write a prompt"); return; }
    $("#send").disabled = true;
    $("#chat-state").textContent = "loading the models…";
    try {
      const loaded = (await api("/api/models", { models })).models;
      $("#chat-state").textContent = "";
      $("#answers").innerHTML = loaded.map((m, i) => `<div class="card answer" data-model="${esc(m.name)}">
        <h3>${esc(m.name)}</h3><div class="small">${esc(m.spec)}</div><div class="text" id="answer-${i}"></div>
        <div class="small" id="finish-${i}"></div></div>`).join("");
      await Promise.all(loaded.map((m, i) => streamAnswer(m.name, prompt, $(`#answer-${i}`), $(`#finish-${i}`))));
    } catch (e) { $("#chat-state").textContent = ""; toast(e.message); }
    finally { $("#send").disabled = false; }
  };
  $("#compare").onclick = async () => {
    try {
      await api("/api/compare", { models: picked(), data: $("#cmp-data").value.trim(), limit: Number($("#cmp-limit").value) || null,
                                  text: $("#cmp-text").value.trim() || null, chain: $("#cmp-chain").checked });
      refreshJobs();
    } catch (e) { toast(e.message); }
  };
  const refreshJobs = async () => {
    const { jobs } = await api("/api/jobs");
    const mine = jobs.filter(j => j.kind === "compare");
    $("#jobs").innerHTML = mine.map(j => `<div class="card"><div class="row"><strong>${esc(j.name)}</strong>
      ${badge(j.alive ? "running" : (j.exit_code === 0 ? "finished" : "failed"))}
      ${j.report ? `<a target="_blank" href="/api/compare/${encodeURIComponent(j.name)}/report.html">open the report</a>` : ""}</div>
      <pre style="margin-top:6px">${esc(j.argv.join(" "))}\n${esc(j.log_tail)}</pre></div>`).join("");
  };
  refreshJobs();
  const timer = setInterval(refreshJobs, 2000);
  cleanup.push(() => clearInterval(timer));
}

async function streamAnswer(model, prompt, out, finish) {
  // the dashboard's chat is `tunesmith serve`'s own OpenAI-compatible endpoint, streamed
  const res = await fetch("/serve/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content: prompt }],
      max_tokens: Number($("#max-tokens").value) || 64, temperature: Number($("#temperature").value) || 0 }) });
  if (!res.ok) { const e = await res.json().catch(() => ({})); out.textContent = (e.error && e.error.message) || `HTTP ${res.status}`; out.classList.add("err"); return; }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") { finish.textContent = finish.textContent || "done"; continue; }
      const chunk = JSON.parse(data);
      if (chunk.error) { out.textContent += `\n[${chunk.error.message}]`; continue; }
      const choice = chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) out.textContent += choice.delta.content;
      if (choice && choice.finish_reason) {
        finish.textContent = `finished: ${choice.finish_reason}`
          + (out.textContent.trim() ? "" : ` (the answer is ${out.textContent.length ? "only whitespace" : "empty"})`);
      }
    }
  }
}

// ---------------------------------------------------------------- routing

function route() {
  for (const fn of cleanup) fn();
  cleanup = [];
  const hash = location.hash || "#/";
  const [, page, arg] = hash.split("/");
  document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active",
    a.dataset.nav === (page === "new" ? "new" : page === "chat" ? "chat" : "runs")));
  if (page === "run" && arg) showRun(decodeURIComponent(arg));
  else if (page === "new") showNew();
  else if (page === "chat") showChat();
  else showRuns();
}
window.addEventListener("hashchange", route);
api("/api/runs").then(d => { $("#where").textContent = `runs: ${d.root}`; }).catch(() => {});
route();
