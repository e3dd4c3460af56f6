// llmrun's chat page: streams from this server's /v1/chat/completions, keeps the conversation in the tab,
// renders Markdown. Everything the model writes is escaped before any markup is added, so a reply can never
// inject HTML or script (the Content-Security-Policy header forbids inline script besides).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, busy: false };
const saved = (key, fallback) => sessionStorage.getItem("llmrun." + key) ?? fallback;

// ---- Markdown, the safe subset: fenced and inline code, headings, emphasis, lists, quotes, http(s) links ----
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  // text is already escaped; code spans are cut out first so nothing inside them is formatted
  const spans = [];
  text = text.replace(/`([^`\n]+)`/g, (_, code) => { spans.push(code); return "\u0000" + (spans.length - 1) + "\u0000"; });
  text = text
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
             '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + spans[Number(i)] + "</code>");
}

function renderMarkdown(source) {
  const out = [];
  const parts = source.split(/^```/m);          // even: prose, odd: code (an open fence runs to the end)
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      const lang = nl < 0 ? "" : part.slice(0, nl).trim();
      const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
      const cls = /^[\w+-]+$/.test(lang) ? ' class="language-' + lang + '"' : "";
      out.push("<pre><code" + cls + ">" + escapeHtml(code) + "</code></pre>");
      return;
    }
    let list = null, para = [];
    const flushPara = () => { if (para.length) { out.push("<p>" + para.join("<br>") + "</p>"); para = []; } };
    const closeList = () => { if (list) { out.push("</" + list + ">"); list = null; } };
    for (const raw of escapeHtml(part).split("\n")) {
      let m;
      if (!raw.trim()) { flushPara(); closeList(); continue; }
      if ((m = raw.match(/^(#{1,6})\s+(.*)$/))) {
        flushPara(); closeList();
        const level = Math.min(m[1].length + 1, 6);
        out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
      } else if ((m = raw.match(/^\s*[-*+]\s+(.*)$/)) || (m = raw.match(/^\s*\d+[.)]\s+(.*)$/))) {
        flushPara();
        const kind = /^\s*\d/.test(raw) ? "ol" : "ul";
        if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline(m[1]) + "</li>");
      } else if ((m = raw.match(/^&gt;\s?(.*)$/))) {
        flushPara(); closeList();
        out.push("<blockquote>" + inline(m[1]) + "</blockquote>");
      } else {
        closeList();
        para.push(inline(raw));
      }
    }
    flushPara(); closeList();
  });
  return out.join("");
}

// ---- the conversation on the page ----------------------------------------------------------------------
function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "user") div.textContent = text; else div.innerHTML = renderMarkdown(text);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(bubble, text) {
  const n = document.createElement("div");
  n.className = "note";
  n.textContent = text;
  bubble.appendChild(n);
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("send").hidden = busy;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try { const body = await response.json(); return body.error?.message || JSON.stringify(body); }
  catch { return response.status + " " + response.statusText; }
}

// ---- streaming one answer ---------------------------------------------------------------------------------
async function send(text) {
  const convo = state.messages;                 // "New chat" starts another array; this answer stays here
  convo.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(convo),
    stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value || 0.7),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;

  state.controller = new AbortController();
  setBusy(true);
  let answer = "", usage = null, finish = null;
  const t0 = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) {
      if (response.status === 401) $("settings").hidden = false;
      throw new Error(await errorText(response));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            bubble.innerHTML = renderMarkdown(answer);
            bubble.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    const stats = usage ? `${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tok/s` : "";
    if (finish === "length") note(bubble, "stopped at the token limit. " + stats);
    else if (stats) note(bubble, stats);
  } catch (err) {
    if (err.name === "AbortError") {
      note(bubble, "stopped");
    } else {
      bubble.classList.add("error");
      note(bubble, "error: " + err.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    if (answer) convo.push({ role: "assistant", content: answer });
    else convo.pop();                           // an unanswered question does not stay in the history
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
});
$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});
for (const id of ["system", "temperature", "max-tokens", "api-key"]) {
  const el = $(id);
  el.value = saved(id, el.value);
  el.addEventListener("change", () => sessionStorage.setItem("llmrun." + id, el.value));
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      $("model-name").textContent = response.status === 401 ? "API key needed (Settings)" : "no model";
      if (response.status === 401) $("settings").hidden = false;
      return;
    }
    const body = await response.json();
    const card = body.data[0];
    $("model-name").textContent = card.id + (card.meta ? ` · ${card.meta.n_ctx} tokens` : "");
  } catch (err) {
    $("model-name").textContent = "server unreachable";
  }
}
$("api-key").addEventListener("change", showModel);
showModel();
$("prompt").focus();
