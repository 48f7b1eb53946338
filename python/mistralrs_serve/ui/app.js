// The chat page: talks to this server's OpenAI API from the browser.
// The conversation lives in localStorage; the API key too, once given.
"use strict";

import { escapeHtml, renderMarkdown } from "./markdown.js";

const STORE = "mistralrs-serve-ui";
const $ = (id) => document.getElementById(id);
const state = load();
let running = null; // {controller} while an answer streams
let models = [];

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    return { messages: saved.messages || [], model: saved.model || null, key: saved.key || null };
  } catch {
    return { messages: [], model: null, key: null };
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body.error ? body.error.message : `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

function showError(text) {
  const banner = $("error");
  banner.textContent = text;
  banner.hidden = !text;
}

function askForKey() {
  $("key-form").hidden = false;
  $("key-input").focus();
}

async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (res.status === 401) {
    askForKey();
    return;
  }
  if (!res.ok) {
    showError(await errorMessage(res));
    return;
  }
  models = (await res.json()).data.filter((m) => (m.kind || "chat") === "chat");
  const picker = $("model");
  picker.innerHTML = "";
  for (const m of models) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.id;
    picker.append(opt);
  }
  if (state.model && models.some((m) => m.id === state.model)) picker.value = state.model;
  state.model = picker.value;
  updateUpload();
}

function currentModel() {
  return models.find((m) => m.id === state.model);
}

function updateUpload() {
  const m = currentModel();
  const images = !!(m && (m.input_modalities || []).includes("image"));
  $("attach").accept = images ? "image/*,.txt,.md,.pdf,.json,.csv" : ".txt,.md,.pdf,.json,.csv";
  $("attach-label").title = images ? "attach images or files" : "attach files";
}

// --- rendering ---

function renderMessage(msg) {
  const div = document.createElement("div");
  div.className = `msg ${msg.role}${msg.error ? " error" : ""}`;
  let html = "";
  if (msg.reasoning) {
    html += `<details class="reasoning"><summary>Reasoning</summary><div>${renderMarkdown(msg.reasoning)}</div></details>`;
  }
  if (Array.isArray(msg.content)) {
    for (const part of msg.content) {
      if (part.type === "text") html += renderMarkdown(part.text);
      else if (part.type === "image_url") html += `<img class="thumb" alt="attached image" src="${escapeHtml(part.image_url.url)}">`;
      else if (part.type === "file") html += `<div class="file">file: ${escapeHtml(part.file.filename)}</div>`;
    }
  } else if (msg.content) {
    html += renderMarkdown(msg.content);
  }
  for (const call of msg.tool_calls || []) {
    html += `<div class="tool-call"><span>tool call</span> <code>${escapeHtml(call.function.name)}(${escapeHtml(call.function.arguments)})</code></div>`;
  }
  if (msg.error) html += `<div class="error-text">${escapeHtml(msg.error)}</div>`;
  if (msg.stats) html += `<div class="stats">${escapeHtml(msg.stats)}</div>`;
  div.innerHTML = html;
  return div;
}

function render() {
  const log = $("log");
  log.innerHTML = "";
  for (const msg of state.messages) log.append(renderMessage(msg));
  log.scrollTop = log.scrollHeight;
}

function renderLast() {
  const log = $("log");
  const last = state.messages[state.messages.length - 1];
  const node = renderMessage(last);
  if (log.lastChild) log.replaceChild(node, log.lastChild);
  else log.append(node);
  log.scrollTop = log.scrollHeight;
}

// --- sending ---

async function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function userContent(text, files) {
  if (!files.length) return text;
  const parts = text ? [{ type: "text", text }] : [];
  for (const file of files) {
    const url = await readFile(file);
    if (file.type.startsWith("image/")) parts.push({ type: "image_url", image_url: { url } });
    else parts.push({ type: "file", file: { filename: file.name, file_data: url } });
  }
  return parts;
}

function wireMessages() {
  return state.messages
    .filter((m) => !m.error || m.content)
    .map((m) => {
      const out = { role: m.role, content: m.content || "" };
      if (m.tool_calls && m.tool_calls.length) out.tool_calls = m.tool_calls;
      return out;
    });
}

function applyDelta(msg, delta) {
  if (delta.content) msg.content = (msg.content || "") + delta.content;
  const reasoning = delta.reasoning_content || delta.reasoning;
  if (reasoning) msg.reasoning = (msg.reasoning || "") + reasoning;
  for (const call of delta.tool_calls || []) {
    msg.tool_calls = msg.tool_calls || [];
    const slot = (msg.tool_calls[call.index] ||= { id: call.id, type: "function", function: { name: "", arguments: "" } });
    if (call.id) slot.id = call.id;
    if (call.function && call.function.name) slot.function.name += call.function.name;
    if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
  }
}

async function streamAnswer(res, answer) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let first = null;
  let tokens = 0;
  let usage = null;
  let lastPaint = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && (choice.delta.content || choice.delta.reasoning_content || choice.delta.tool_calls)) {
            first = first || performance.now();
            tokens++;
            applyDelta(answer, choice.delta);
          }
        }
      }
    }
    if (performance.now() - lastPaint > 50) {
      renderLast();
      lastPaint = performance.now();
    }
  }
  const count = usage ? usage.completion_tokens : tokens;
  const seconds = first ? (performance.now() - first) / 1000 : 0;
  answer.stats = seconds > 0 ? `${count} tokens, ${(count / seconds).toFixed(1)} tok/s` : `${count} tokens`;
}

async function send(text, files) {
  showError("");
  state.messages.push({ role: "user", content: await userContent(text, files) });
  const answer = { role: "assistant", content: "" };
  const body = {
    model: state.model,
    messages: wireMessages(),
    stream: true,
    stream_options: { include_usage: true },
  };
  state.messages.push(answer);
  render();
  const controller = new AbortController();
  running = { controller };
  setRunning(true);
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (res.status === 401) askForKey();
    if (!res.ok) throw new Error(await errorMessage(res));
    await streamAnswer(res, answer);
  } catch (e) {
    if (e.name === "AbortError") answer.stats = "stopped";
    else answer.error = e.message || String(e);
  } finally {
    running = null;
    setRunning(false);
    save();
    renderLast();
  }
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

// --- wiring ---

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const files = Array.from($("attach").files);
  if ((!text && !files.length) || running) return;
  $("prompt").value = "";
  $("attach").value = "";
  $("attachments").textContent = "";
  await send(text, files);
  $("prompt").focus();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => running && running.controller.abort());
$("model").addEventListener("change", () => {
  state.model = $("model").value;
  save();
  updateUpload();
});
$("attach").addEventListener("change", () => {
  $("attachments").textContent = Array.from($("attach").files, (f) => f.name).join(", ");
});
$("new-chat").addEventListener("click", () => {
  if (running) running.controller.abort();
  state.messages = [];
  save();
  render();
});
$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("key-input").value.trim() || null;
  save();
  $("key-form").hidden = true;
  await loadModels();
});

render();
loadModels().catch((e) => showError(e.message));
