// r1lab web chat: one conversation, streamed from /v1/chat/completions. The thinking (reasoning_content) goes
// into a foldable block, the answer (content) below it. Only answers are sent back as history: the API rejects
// a previous reasoning_content, as DeepSeek's does.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), promptBox = $("prompt"), sendBtn = $("send"), stopBtn = $("stop"), statusLine = $("status");
const temperature = $("temperature"), temperatureValue = $("temperature-value"), maxTokens = $("max-tokens");
const apiKey = $("api-key");

let history = [];          // [{role, content}] sent with every request
let modelName = null;
let controller = null;     // AbortController of the running request

// ------------------------------------------------------------------ settings, kept across reloads

for (const [el, key] of [[temperature, "temperature"], [maxTokens, "maxTokens"], [apiKey, "apiKey"]]) {
  const saved = localStorage.getItem("r1lab." + key);
  if (saved !== null) el.value = saved;
  el.addEventListener("change", () => localStorage.setItem("r1lab." + key, el.value));
}
const showTemperature = () => { temperatureValue.textContent = Number(temperature.value).toFixed(2); };
temperature.addEventListener("input", showTemperature);
showTemperature();

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value.trim()) h["Authorization"] = "Bearer " + apiKey.value.trim();
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = modelName;
    const ctx = body.data[0].max_model_len;
    if (ctx) maxTokens.max = ctx;
    setStatus("");
  } catch (e) {
    $("model").textContent = "not connected";
    setStatus("Could not list models: " + e.message);
  }
}
apiKey.addEventListener("change", loadModel);

// ------------------------------------------------------------------ rendering

function setStatus(text) { statusLine.textContent = text; }

function scrollDown() {
  const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 120;
  if (nearBottom) log.scrollTop = log.scrollHeight;
}

function addUser(text) {
  $("empty").hidden = true;
  const el = document.createElement("article");
  el.className = "msg user";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  el.appendChild(bubble);
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

function addAssistant() {
  const el = $("assistant-template").content.firstElementChild.cloneNode(true);
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return {
    el,
    thinking: el.querySelector(".thinking"),
    thinkingLabel: el.querySelector(".thinking-label"),
    thinkingBody: el.querySelector(".thinking-body"),
    answer: el.querySelector(".answer"),
    meta: el.querySelector(".meta"),
  };
}

// A tool call (<tool> program </tool>) and the tool's output (<output> ... </output>) are marked inside the thinking.
const TOOL_SPANS = [["<tool>", "</tool>", "tool-call"], ["<output>", "</output>", "tool-output"]];

function renderThinking(body, text) {
  body.replaceChildren();
  let i = 0;
  while (i < text.length) {
    let best = null;
    for (const [open, close, cls] of TOOL_SPANS) {
      const at = text.indexOf(open, i);
      if (at >= 0 && (best === null || at < best.at)) best = { at, close, cls };
    }
    if (best === null) { body.append(text.slice(i)); break; }
    if (best.at > i) body.append(text.slice(i, best.at));
    const end = text.indexOf(best.close, best.at);
    const stop = end < 0 ? text.length : end + best.close.length;
    const span = document.createElement("span");
    span.className = best.cls;
    span.textContent = text.slice(best.at, stop);
    body.append(span);
    i = stop;
  }
}

function showError(view, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = message;
  view.el.appendChild(box);
  scrollDown();
}

// ------------------------------------------------------------------ streaming

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  const userEl = addUser(text);
  const view = addAssistant();
  view.thinking.classList.add("live");
  busy(true);

  const body = {
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(temperature.value),
  };
  if (modelName) body.model = modelName;
  const mt = parseInt(maxTokens.value, 10);
  if (Number.isFinite(mt)) body.max_tokens = mt;

  controller = new AbortController();
  const started = performance.now();
  let thinkingDone = null, reasoning = "", answer = "", finish = null, usage = null, failed = false;

  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) message = e.error.message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content) {
          reasoning += d.reasoning_content;
          renderThinking(view.thinkingBody, reasoning);
        }
        if (d.content) {
          if (thinkingDone === null) thinkingDone = performance.now();
          answer += d.content;
          view.answer.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    }
  } catch (e) {
    failed = true;
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      showError(view, e.message);
    }
  } finally {
    controller = null;
    busy(false);
  }

  const seconds = ((thinkingDone ?? performance.now()) - started) / 1000;
  view.thinking.classList.remove("live");
  if (!view.thinkingBody.textContent) {
    view.thinking.classList.add("empty-thinking");
  } else {
    view.thinkingLabel.textContent = `Thought for ${seconds.toFixed(1)} s`;
  }
  if (failed && finish !== "stopped") {
    history.pop();  // the server did not answer this turn: it is not part of the conversation; retry it
    userEl.classList.add("unsent");
    userEl.title = "not answered: not part of the conversation";
    view.answer.remove();
    view.meta.remove();
    return;
  }
  if (!answer && finish === "length") {
    view.answer.classList.add("note");
    view.answer.textContent = "No answer: the reply reached max tokens while still thinking.";
  }
  const parts = [];
  if (usage) {
    const r = usage.completion_tokens_details ? usage.completion_tokens_details.reasoning_tokens : null;
    parts.push(`${usage.completion_tokens} tokens` + (r !== null && r !== undefined ? ` (${r} thinking)` : ""));
  }
  parts.push(`${((performance.now() - started) / 1000).toFixed(1)} s`);
  if (finish) {
    parts.push(finish === "length" ? "cut off at max tokens" : finish === "stopped" ? "stopped"
      : finish === "tool_limit" ? "stopped at the tool-call limit" : "finished");
  }
  view.meta.textContent = parts.join(" · ");
  history.push({ role: "assistant", content: answer });
}

function busy(on) {
  sendBtn.hidden = on;
  stopBtn.hidden = !on;
  promptBox.disabled = false;
  setStatus(on ? "generating…" : "");
  if (!on) promptBox.focus();
}

// ------------------------------------------------------------------ wiring

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = promptBox.value.trim();
  if (!text || controller) return;
  promptBox.value = "";
  send(text);
});

promptBox.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  for (const el of [...log.querySelectorAll(".msg")]) el.remove();
  $("empty").hidden = false;
  promptBox.focus();
});

loadModel();
promptBox.focus();
