// The retserve playground: plain JS, no framework, no build step, nothing from elsewhere.
//
// A chat keeps its memory in the session's recurrent state on the server: every turn sends only the
// new text ("User: ...\n\nAssistant:", the plain template of server/chat.py) to
// POST /v1/sessions/{id}/generate with stream=true, and the reply stops before the next "\nUser:".
// The API key lives in this tab's sessionStorage only and goes out as `Authorization: Bearer`.
"use strict";

const KEY = "retserve.apiKey";
const CURRENT = "retserve.current";
const CHAT_STOP = ["\nUser:", "\nSystem:"];
const PRIME_CHUNK_CHARS = 6000; // a long document is read in pieces, so the progress bar moves
const HISTORY_ROWS = 8;

const $ = (sel) => document.querySelector(sel);
const ui = {
  current: null, // the selected session id
  sessions: [], // the server's list (SessionObject)
  busy: false,
  abort: null, // AbortController of the running stream
};

// ---- API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

function authHeaders(extra) {
  const h = Object.assign({}, extra);
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorOf(r) {
  let message = `${r.status} ${r.statusText}`;
  let code = null;
  try {
    const body = await r.json();
    if (body && body.error) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch (_) {
    /* not JSON: keep the status line */
  }
  if (r.status === 401) message += " (enter an API key at the top)";
  return new ApiError(r.status, message, code);
}

// fetch `path`; JSON `body` (an object) or raw bytes (a Blob); the Response when ok, else ApiError
async function request(method, path, body, signal) {
  const init = { method, headers: authHeaders(), signal };
  if (body instanceof Blob) {
    init.headers["Content-Type"] = "application/octet-stream";
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await errorOf(r);
  return r;
}

const api = async (method, path, body) => (await request(method, path, body)).json();
const sessionPath = (id, rest) => "/v1/sessions/" + encodeURIComponent(id) + (rest || "");

// the data of each server-sent event of a streamed response
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

// ---- per-session browser memory (sessionStorage): transcript, text tail, memory history --------

function local(id) {
  const raw = sessionStorage.getItem("retserve.session." + id);
  const empty = { turns: [], tail: null, history: [] };
  if (!raw) return empty;
  try {
    return Object.assign(empty, JSON.parse(raw));
  } catch (_) {
    return empty;
  }
}

function saveLocal(id, data) {
  try {
    sessionStorage.setItem("retserve.session." + id, JSON.stringify(data));
  } catch (_) {
    /* storage full: the transcript is a convenience, the memory is on the server */
  }
}

// what goes before "User:" so that the text the state read follows the template's "\n\n" turns
function separator(tail, tokens) {
  if (!tokens) return "";
  if (tail === null) return "\n\n";
  if (tail.endsWith("\n\n")) return "";
  return tail.endsWith("\n") ? "\n" : "\n\n";
}

// ---- notices ----------------------------------------------------------------------------------

function notify(message, isError) {
  const n = $("#notice");
  n.textContent = message;
  n.className = isError ? "error" : "info";
  n.hidden = !message;
}

function guard(fn) {
  return async (...args) => {
    try {
      notify("");
      await fn(...args);
    } catch (e) {
      if (e.name === "AbortError") return;
      notify(e.message || String(e), true);
      if (e instanceof ApiError) console.warn(e.status, e.message); // the server's answer: shown above
      else console.error(e); // a bug here
    }
  };
}

// ---- sessions sidebar -------------------------------------------------------------------------

async function loadSessions() {
  const all = [];
  let cursor = null;
  do {
    const q = new URLSearchParams({ limit: "100" });
    if (cursor) q.set("cursor", cursor);
    const page = await api("GET", "/v1/sessions?" + q);
    all.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && all.length < 2000);
  all.sort((a, b) => b.updated_at - a.updated_at || a.id.localeCompare(b.id));
  ui.sessions = all;
  renderSessions();
}

function button(label, action, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.title = title;
  return b;
}

function renderSessions() {
  const list = $("#sessions");
  list.replaceChildren();
  for (const s of ui.sessions) {
    const li = document.createElement("li");
    li.dataset.sessionId = s.id;
    li.className = s.id === ui.current ? "session selected" : "session";
    const name = document.createElement("button");
    name.type = "button";
    name.className = "name";
    name.dataset.action = "select";
    name.textContent = s.id;
    name.title = s.id;
    const meta = document.createElement("span");
    meta.className = "dim small";
    meta.textContent = `${s.tokens} tokens · ${formatBytes(s.size_bytes)}`;
    const actions = document.createElement("span");
    actions.className = "actions";
    actions.append(
      button("fork", "fork", "copy this session's memory to a new session"),
      button("export", "export", "download the state blob (.rstate)"),
      button("delete", "delete", "delete (click twice)"),
    );
    li.append(name, meta, actions);
    list.append(li);
  }
  $("#sessions-empty").hidden = ui.sessions.length > 0;
}

async function selectSession(id) {
  ui.current = id;
  if (id) sessionStorage.setItem(CURRENT, id);
  else sessionStorage.removeItem(CURRENT);
  $("#current-title").textContent = id || "No session selected";
  $("#fork-current").disabled = !id;
  $("#export-current").disabled = !id;
  renderSessions();
  renderTranscript();
  await refreshStats();
}

async function createSession(id) {
  const s = await api("POST", "/v1/sessions", id ? { session_id: id } : {});
  await loadSessions();
  await selectSession(s.id);
  return s.id;
}

async function forkSession(id) {
  const s = await api("POST", sessionPath(id, "/fork"), {});
  saveLocal(s.id, local(id)); // the fork remembers what its source did
  await loadSessions();
  await selectSession(s.id);
  notify(`forked ${id} into ${s.id}`);
}

async function exportSession(id) {
  const r = await request("GET", sessionPath(id, "/state"));
  const blob = await r.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = id + ".rstate";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  notify(`exported ${id} (${formatBytes(blob.size)})`);
}

async function deleteSession(id, btn) {
  if (btn.dataset.armed !== "1") {
    btn.dataset.armed = "1";
    btn.textContent = "sure?";
    setTimeout(() => {
      btn.dataset.armed = "";
      btn.textContent = "delete";
    }, 4000);
    return;
  }
  await api("DELETE", sessionPath(id));
  sessionStorage.removeItem("retserve.session." + id);
  if (ui.current === id) await selectSession(null);
  await loadSessions();
}

const ID_OK = /^[A-Za-z0-9_.@+=~-]{1,128}$/;

function importId(fileName) {
  let stem = fileName.replace(/\.rstate$/i, "").replace(/[^A-Za-z0-9_.@+=~-]/g, "_").slice(0, 100);
  if (!ID_OK.test(stem) || stem === "merge") stem = "imported";
  const taken = new Set(ui.sessions.map((s) => s.id));
  let id = stem;
  for (let n = 2; taken.has(id); n++) id = `${stem}-${n}`;
  return id;
}

async function importFile(file) {
  const id = importId(file.name);
  const s = await api("PUT", sessionPath(id, "/state"), file);
  saveLocal(id, { turns: [], tail: null, history: [] });
  await loadSessions();
  await selectSession(s.id);
  notify(`imported ${file.name} as ${s.id} (${s.tokens} tokens read)`);
}

// ---- chat ---------------------------------------------------------------------------------------

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Model" : "Document";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("#messages").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

function renderTranscript() {
  $("#messages").replaceChildren();
  if (!ui.current) return;
  for (const t of local(ui.current).turns) bubble(t.role, t.text);
}

function numberField(id) {
  const v = $("#" + id).value.trim();
  return v === "" ? null : Number(v);
}

const SAMPLING = "retserve.sampling";
const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"];

function keepSampling() {
  const values = Object.fromEntries(SAMPLING_FIELDS.map((f) => [f, $("#" + f).value]));
  sessionStorage.setItem(SAMPLING, JSON.stringify(values));
}

function restoreSampling() {
  try {
    const values = JSON.parse(sessionStorage.getItem(SAMPLING) || "{}");
    for (const f of SAMPLING_FIELDS) if (typeof values[f] === "string") $("#" + f).value = values[f];
  } catch (_) {
    /* nothing kept */
  }
  for (const f of SAMPLING_FIELDS) $("#" + f).addEventListener("change", keepSampling);
}

function samplingBody() {
  const body = {
    temperature: numberField("temperature") ?? 1.0,
    top_p: numberField("top_p") ?? 1.0,
    top_k: numberField("top_k") ?? 0,
    repetition_penalty: numberField("repetition_penalty") ?? 1.0,
    max_tokens: numberField("max_tokens") ?? 128,
  };
  const seed = numberField("seed");
  if (seed !== null) body.seed = seed;
  return body;
}

function setBusy(busy) {
  ui.busy = busy;
  $("#send").disabled = busy;
  $("#prime").disabled = busy;
  $("#stop").disabled = !busy;
}

async function streamReply(id, prompt, out) {
  const body = Object.assign(samplingBody(), {
    prompt,
    stream: true,
    stop: CHAT_STOP,
    stream_options: { include_usage: true },
  });
  ui.abort = new AbortController();
  const r = await request("POST", sessionPath(id, "/generate"), body, ui.abort.signal);
  const res = { text: "", chunks: 0, usage: null, finish: null };
  for await (const data of sseData(r)) {
    if (data === "[DONE]") break;
    const j = JSON.parse(data);
    if (j.error) throw new ApiError(500, j.error.message, j.error.code);
    const choice = j.choices && j.choices[0];
    if (choice && choice.text) {
      res.text += choice.text;
      res.chunks += 1;
      out.textContent = res.text;
      out.dataset.chunks = String(res.chunks);
      out.scrollIntoView({ block: "end" });
    }
    if (choice && choice.finish_reason) res.finish = choice.finish_reason;
    if (j.usage) res.usage = j.usage;
  }
  return res;
}

async function sendMessage() {
  const text = $("#prompt").value.trim();
  if (!text || ui.busy) return;
  setBusy(true);
  try {
    const id = ui.current || (await createSession(null));
    const mem = local(id);
    const info = ui.sessions.find((s) => s.id === id);
    const prompt = separator(mem.tail, info ? info.tokens : 0) + "User: " + text + "\n\nAssistant:";
    $("#prompt").value = "";
    bubble("user", text);
    mem.turns.push({ role: "user", text });
    saveLocal(id, mem);
    const out = bubble("assistant", "");
    out.parentElement.classList.add("streaming");
    let res = { text: "", chunks: 0, usage: null, finish: "abort" };
    try {
      res = await streamReply(id, prompt, out);
    } finally {
      out.parentElement.classList.remove("streaming");
      out.parentElement.dataset.done = "1";
      mem.turns.push({ role: "assistant", text: out.textContent });
      mem.tail = (prompt + out.textContent).slice(-2);
      saveLocal(id, mem);
    }
    const u = res.usage;
    $("#turn-info").textContent = u
      ? `read ${u.prompt_tokens} + wrote ${u.completion_tokens} tokens (${res.finish})`
      : "";
  } finally {
    ui.abort = null;
    setBusy(false);
    await afterChange();
  }
}

async function afterChange() {
  await loadSessions();
  await refreshStats();
}

// ---- priming a document -------------------------------------------------------------------------

// pieces of at most PRIME_CHUNK_CHARS, cut before whitespace (a word keeps its leading space)
function pieces(text) {
  const out = [];
  let rest = text;
  while (rest.length > PRIME_CHUNK_CHARS) {
    let cut = rest.lastIndexOf(" ", PRIME_CHUNK_CHARS);
    if (cut <= 0) cut = PRIME_CHUNK_CHARS;
    out.push(rest.slice(0, cut));
    rest = rest.slice(cut);
  }
  if (rest) out.push(rest);
  return out;
}

async function primeDocument() {
  if (ui.busy) return;
  const file = $("#doc-file").files[0];
  const text = file ? await file.text() : $("#doc").value;
  if (!text.trim()) {
    notify("paste a document or choose a text file first", true);
    return;
  }
  setBusy(true);
  const bar = $("#prime-progress");
  try {
    const id = ui.current || (await createSession(null));
    const parts = pieces(text);
    bar.hidden = false;
    bar.max = parts.length;
    bar.value = 0;
    let s = null;
    for (const [i, part] of parts.entries()) {
      $("#prime-info").textContent = `reading piece ${i + 1} of ${parts.length}…`;
      s = await api("POST", sessionPath(id, "/prime"), { prompt: part });
      bar.value = i + 1;
    }
    const mem = local(id);
    mem.turns.push({ role: "document", text: text.length > 400 ? text.slice(0, 400) + " …" : text });
    mem.tail = text.slice(-2);
    saveLocal(id, mem);
    renderTranscript();
    $("#prime-info").textContent = `read ${text.length} characters; the session has read ${s.tokens} tokens`;
    $("#doc").value = "";
    $("#doc-file").value = "";
  } finally {
    setBusy(false);
    await afterChange();
  }
}

// ---- memory view --------------------------------------------------------------------------------

function formatBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}

function heatColor(x) {
  // 0 -> pale, 1 -> deep; sqrt so that small norms still show
  const t = Math.sqrt(Math.max(0, Math.min(1, x)));
  return `hsl(${220 - 200 * t}, ${55 + 35 * t}%, ${96 - 50 * t}%)`;
}

function renderHeatmap(stats) {
  const map = $("#heatmap");
  map.replaceChildren();
  map.style.gridTemplateColumns = `auto repeat(${stats.num_heads}, 1fr)`;
  const max = Math.max(1e-12, ...stats.state_norms.flat());
  map.append(label(""));
  for (let h = 0; h < stats.num_heads; h++) map.append(label("h" + h));
  stats.state_norms.forEach((row, l) => {
    map.append(label("L" + l));
    row.forEach((norm, h) => {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.dataset.layer = String(l);
      cell.dataset.head = String(h);
      cell.title = `layer ${l}, head ${h}: norm ${norm.toPrecision(4)}`;
      cell.style.backgroundColor = heatColor(norm / max);
      map.append(cell);
    });
  });
}

function label(text) {
  const d = document.createElement("div");
  d.className = "label";
  d.textContent = text;
  return d;
}

function renderHistory(history) {
  const body = $("#mem-history tbody");
  body.replaceChildren();
  for (const p of history.slice(-HISTORY_ROWS)) {
    const tr = document.createElement("tr");
    for (const v of [String(p.tokens), formatBytes(p.state_bytes)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
}

async function refreshStats() {
  const id = ui.current;
  if (!id) {
    for (const f of ["#mem-tokens", "#mem-state", "#mem-stored", "#mem-shape"]) $(f).textContent = "-";
    $("#heatmap").replaceChildren();
    renderHistory([]);
    return;
  }
  const stats = await api("GET", sessionPath(id, "/stats"));
  if (ui.current !== id) return; // another session was selected meanwhile
  $("#mem-tokens").textContent = String(stats.tokens);
  $("#mem-state").textContent = formatBytes(stats.state_bytes);
  $("#mem-stored").textContent = formatBytes(stats.stored_bytes);
  $("#mem-shape").textContent = `${stats.num_layers} × [${stats.state_shape.join(" × ")}] ${stats.dtype}`;
  renderHeatmap(stats);
  const mem = local(id);
  const last = mem.history[mem.history.length - 1];
  if (!last || last.tokens !== stats.tokens) {
    mem.history.push({ tokens: stats.tokens, state_bytes: stats.state_bytes });
    mem.history = mem.history.slice(-50);
    saveLocal(id, mem);
  }
  renderHistory(mem.history);
}

// ---- wiring -------------------------------------------------------------------------------------

async function onSessionClick(ev) {
  const btn = ev.target.closest("button[data-action]");
  const li = ev.target.closest("li[data-session-id]");
  if (!btn || !li) return;
  const id = li.dataset.sessionId;
  const action = btn.dataset.action;
  if (action === "select") await selectSession(id);
  else if (action === "fork") await forkSession(id);
  else if (action === "export") await exportSession(id);
  else if (action === "delete") await deleteSession(id, btn);
}

async function start() {
  const key = sessionStorage.getItem(KEY);
  if (key) $("#api-key").value = key;
  restoreSampling();
  $("#key-form").addEventListener(
    "submit",
    guard(async (ev) => {
      ev.preventDefault();
      const v = $("#api-key").value.trim();
      if (v) sessionStorage.setItem(KEY, v);
      else sessionStorage.removeItem(KEY);
      await loadSessions();
      await selectSession(ui.sessions.some((s) => s.id === ui.current) ? ui.current : null);
      notify(v ? "API key set for this tab" : "no API key");
    }),
  );
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("#api-key").value = "";
    notify("API key forgotten");
  });
  $("#new-form").addEventListener(
    "submit",
    guard(async (ev) => {
      ev.preventDefault();
      const id = $("#new-id").value.trim();
      if (id && !ID_OK.test(id)) throw new Error("a session id is 1-128 of A-Z a-z 0-9 _ . @ + = ~ -");
      await createSession(id || null);
      $("#new-id").value = "";
    }),
  );
  $("#sessions").addEventListener("click", guard(onSessionClick));
  $("#import-file").addEventListener(
    "change",
    guard(async (ev) => {
      const file = ev.target.files[0];
      ev.target.value = "";
      if (file) await importFile(file);
    }),
  );
  $("#fork-current").addEventListener("click", guard(() => forkSession(ui.current)));
  $("#export-current").addEventListener("click", guard(() => exportSession(ui.current)));
  $("#chat-form").addEventListener(
    "submit",
    guard(async (ev) => {
      ev.preventDefault();
      await sendMessage();
    }),
  );
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", () => ui.abort && ui.abort.abort());
  $("#prime").addEventListener("click", guard(primeDocument));

  await guard(async () => {
    const models = await api("GET", "/v1/models");
    $("#model").textContent = models.data.map((m) => m.id).join(", ");
  })();
  await guard(async () => {
    await loadSessions();
    const saved = sessionStorage.getItem(CURRENT);
    await selectSession(ui.sessions.some((s) => s.id === saved) ? saved : null);
  })();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);
