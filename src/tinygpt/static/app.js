// tinyGPT playground: streams tokens from POST /api/generate, colours each by its
// probability, shows the alternatives the model weighed, and fetches attention weights
// from POST /api/attention for the token you select. Plain JavaScript, no build step.
// A character model's tokens are characters, and the page says "character"; a BPE
// model's token is a run of bytes, which may end inside a character: its text ("char")
// is then "" and the character appears with the token that completes it.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,          // GET /api/info: model config, tokenizer kind and server limits
  unit: "character",   // what a token is called: "character" (char tokenizer) or "token" (BPE)
  prompt: "",          // the prompt of the current output
  steps: [],           // one {char, token, id, prob, top: [{char, id, prob}]} per generated token
  selected: -1,        // index into steps
  controller: null,    // AbortController of the running generation
  attention: new Map() // step index -> /api/attention response
};

// ---------------------------------------------------------------------------- helpers

function probabilityColour(p) {
  return `hsl(212 85% ${(97 - 37 * p).toFixed(1)}%)`;
}

function attentionColour(share) {
  return `hsl(24 95% ${(98 - 48 * share).toFixed(1)}%)`;
}

// a token's text with its blanks made visible, and other control characters as \xNN
function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥")
    .replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
}

function units(count) {
  return `${count} ${state.unit}${count === 1 ? "" : "s"}`;
}

function capitalised(word) {
  return word[0].toUpperCase() + word.slice(1);
}

// text into node, with a ↵ marker (drawn by CSS, so not part of the text) before each newline
function appendText(node, text) {
  text.split("\n").forEach((line, k) => {
    if (k > 0) node.append(element("span", "nl"), "\n");
    if (line) node.append(line);
  });
  return node;
}

function percent(p) {
  return p >= 0.1 ? `${(100 * p).toFixed(0)}%` : `${(100 * p).toFixed(1)}%`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function alternativesList(step) {
  const list = element("ol", "alternatives");
  for (const alt of step.top) {
    const item = element("li", alt.id === step.id ? "chosen" : "");
    const name = element("span", "char-name", visible(alt.char));
    name.title = visible(alt.char);
    item.append(name);
    const bar = element("span", "bar");
    bar.style.width = `${Math.max(1, 100 * alt.prob)}%`;
    item.append(bar, element("span", "", percent(alt.prob)));
    list.append(item);
  }
  return list;
}

// ---------------------------------------------------------------------------- the API key

// A server started with --api-key answers 401 without `Authorization: Bearer KEY`. The page
// then asks for the key once and keeps it in sessionStorage: for this tab only, gone when it
// closes, never written to disk by the page.
const KEY_STORAGE = "tinygpt-api-key";

function withKey(options = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...options, headers: { ...options.headers, Authorization: `Bearer ${key}` } } : options;
}

// the key the person types into the key form (shown until then), stored for the next requests
function askForKey(message) {
  const form = $("key-form");
  $("key-message").textContent = message;
  form.hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
      form.hidden = true;
      resolve();
    }, { once: true });
  });
}

// fetch, with the key when there is one; a 401 asks for the key and sends the request again
async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, withKey(options));
    if (response.status !== 401) return response;
    const hadKey = sessionStorage.getItem(KEY_STORAGE) !== null;
    sessionStorage.removeItem(KEY_STORAGE);
    await askForKey(hadKey ? "That key was refused; try again." : "This server needs its API key.");
  }
}

// ---------------------------------------------------------------------------- start-up

async function loadInfo() {
  const response = await api("/api/info");
  if (!response.ok) {
    $("model-info").textContent = `could not load the model: ${await errorMessage(response)}`;
    return;
  }
  const info = await response.json();
  state.info = info;
  state.unit = info.tokenizer === "bpe" ? "token" : "character";
  for (const node of document.querySelectorAll(".unit")) node.textContent = state.unit;
  const c = info.config;
  const vocabulary = info.tokenizer === "bpe" ? `a byte-level BPE of ${c.vocab_size} tokens` : `${c.vocab_size} symbols`;
  $("model-info").textContent =
    `${info.model}: ${(info.parameters / 1e6).toFixed(2)} M parameters, ${c.n_layer} layers × ${c.n_head} heads, ` +
    `context ${units(c.block_size)}, ${vocabulary}`;
  $("length").max = info.limits.max_tokens;
  for (let layer = 0; layer < c.n_layer; layer++) $("layer").append(new Option(`${layer + 1}`, layer));
  $("head").append(new Option("all (mean)", "mean"));
  for (let head = 0; head < c.n_head; head++) $("head").append(new Option(`${head + 1}`, head));
  $("layer").value = c.n_layer - 1;
}

// ---------------------------------------------------------------------------- generation

function readControls() {
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const body = {
    prompt: $("prompt").value,
    temperature: number("temperature") ?? 0.8,
    top_k: number("top-k") || null,
    top_p: number("top-p"),
    max_tokens: number("length") ?? 300,
    seed: number("seed"),
  };
  if (body.top_p === null || body.top_p >= 1) body.top_p = null;
  return body;
}

function resetOutput(prompt) {
  state.prompt = prompt;
  state.steps = [];
  state.selected = -1;
  state.attention.clear();
  const output = $("output");
  output.replaceChildren(element("span", "prompt", prompt));
  $("details").replaceChildren(element("p", "hint", `No ${state.unit} selected yet.`));
  $("heatmap").replaceChildren();
  hideTooltip();
}

function appendSteps(steps) {
  const output = $("output");
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
  const fragment = document.createDocumentFragment();
  for (const step of steps) {
    const index = state.steps.length;
    state.steps.push(step);
    // a token that ends inside a character adds no text yet: a small block still shows it
    const span = appendText(element("span", step.char === "" ? "ch partial" : "ch"), step.char);
    span.dataset.index = index;
    span.dataset.prob = step.prob;
    span.style.backgroundColor = probabilityColour(step.prob);
    fragment.append(span);
  }
  output.append(fragment);
  if (atBottom) output.scrollTop = output.scrollHeight;
}

async function generate(event) {
  event.preventDefault();
  if (state.controller) return;
  const body = readControls();
  resetOutput(body.prompt);
  const controller = new AbortController();
  state.controller = controller;
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  try {
    const response = await api("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      setStatus(await errorMessage(response), true);
      return;
    }
    await readEvents(response);
  } catch (error) {
    if (error.name === "AbortError") setStatus(`stopped after ${units(state.steps.length)}`);
    else setStatus(`connection failed: ${error.message}`, true);
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const pending = [];
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const message = JSON.parse(data);
      if (message.char !== undefined) pending.push(message);
      else if (message.error) setStatus(message.error.message, true);
      else if (message.finish_reason) {
        const rate = message.seconds > 0 ? `, ${(message.tokens / message.seconds).toFixed(0)} ${state.unit}s/s` : "";
        setStatus(`${units(message.tokens)}${rate}`);
      }
    }
    if (pending.length) appendSteps(pending);
  }
}

// ---------------------------------------------------------------------------- inspecting a token

function spanAt(index) {
  return $("output").querySelector(`.ch[data-index="${index}"]`);
}

function select(index, { tooltip = false } = {}) {
  if (index < 0 || index >= state.steps.length) return;
  const previous = spanAt(state.selected);
  if (previous) previous.classList.remove("selected");
  state.selected = index;
  const span = spanAt(index);
  span.classList.add("selected");
  span.scrollIntoView({ block: "nearest" });
  const step = state.steps[index];
  const heading = element("p", "", "");
  heading.append(
    `${capitalised(state.unit)} ${index + 1}: `,
    element("strong", "char-name", visible(step.token)),
    ` — the model gave it ${percent(step.prob)}. Its top ${step.top.length} candidates:`
  );
  $("details").replaceChildren(heading, alternativesList(step));
  if (tooltip) showTooltip(span, step);
  if (!$("attention").hidden) loadAttention();
}

function showTooltip(span, step) {
  const tip = $("tooltip");
  tip.replaceChildren(element("div", "", `${visible(step.token)}  ${percent(step.prob)}`), alternativesList(step));
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const width = tip.offsetWidth;
  const height = tip.offsetHeight;
  let left = Math.min(box.left, window.innerWidth - width - 8);
  let top = box.bottom + 6;
  if (top + height > window.innerHeight - 8) top = box.top - height - 6;
  tip.style.left = `${Math.max(8, left)}px`;
  tip.style.top = `${Math.max(8, top)}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

function onOutputKey(event) {
  const last = state.steps.length - 1;
  if (last < 0) return;
  const moves = {
    ArrowRight: state.selected + 1,
    ArrowLeft: state.selected < 0 ? last : state.selected - 1,
    Home: 0,
    End: last,
  };
  if (event.key in moves) {
    event.preventDefault();
    select(Math.max(0, Math.min(last, moves[event.key])), { tooltip: true });
  } else if (event.key === "Enter" && state.selected >= 0) {
    event.preventDefault();
    toggleAttention(true);
  } else if (event.key === "Escape") {
    hideTooltip();
  }
}

// ---------------------------------------------------------------------------- attention

function toggleAttention(open) {
  const section = $("attention");
  section.hidden = open === undefined ? !section.hidden : !open;
  $("toggle-attention").setAttribute("aria-expanded", String(!section.hidden));
  $("toggle-attention").textContent = section.hidden ? "Show attention" : "Hide attention";
  if (!section.hidden) {
    if (state.selected < 0 && state.steps.length) select(state.steps.length - 1);
    else loadAttention();
    section.scrollIntoView({ block: "nearest" });
  }
}

async function loadAttention() {
  const index = state.selected;
  if (index < 0) return;
  if (!state.attention.has(index)) {
    // the prompt, then the tokens generated before this one as ids: their text, encoded
    // again, could give other tokens (a BPE merges across them) than the model saw
    const ids = state.steps.slice(0, index).map((s) => s.id);
    $("attention-caption").textContent = "loading attention…";
    const response = await api("/api/attention", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: state.prompt, ids, query: -1 }),
    });
    if (!response.ok) {
      $("attention-caption").textContent = await errorMessage(response);
      return;
    }
    state.attention.set(index, await response.json());
  }
  if (index === state.selected) drawHeatmap(index);
}

function drawHeatmap(index) {
  const result = state.attention.get(index);
  const layer = Number($("layer").value);
  const heads = result.weights[layer];
  const head = $("head").value;
  let row;
  if (head === "mean") {
    row = heads[0].map((_, k) => heads.reduce((sum, h) => sum + h[k], 0) / heads.length);
  } else {
    row = heads[Number(head)];
  }
  const peak = Math.max(...row);
  const fragment = document.createDocumentFragment();
  if (result.offset > 0) fragment.append(element("span", "hint", `…${units(result.offset)} earlier, out of view… `));
  result.tokens.forEach((token, k) => {
    const cell = appendText(element("span", "cell"), token);
    cell.style.backgroundColor = attentionColour(peak > 0 ? row[k] / peak : 0);
    cell.dataset.weight = row[k];
    cell.title = `${visible(token)}: ${percent(row[k])}`;
    fragment.append(cell);
  });
  const step = state.steps[index];
  fragment.append(element("span", "target", `→ ${visible(step.token)}`));
  $("heatmap").replaceChildren(fragment);
  const headName = head === "mean" ? "all heads (mean)" : `head ${Number(head) + 1}`;
  $("attention-caption").textContent =
    `Layer ${layer + 1}, ${headName}: where the last position looked when predicting ${state.unit} ${index + 1} ` +
    `(“${visible(step.token)}”). Darker: more attention.`;
}

// ---------------------------------------------------------------------------- wiring

function wire() {
  $("compose").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("compose").requestSubmit();
  });
  const output = $("output");
  output.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".ch");
    if (span) showTooltip(span, state.steps[Number(span.dataset.index)]);
  });
  output.addEventListener("mouseleave", hideTooltip);
  output.addEventListener("click", (event) => {
    const span = event.target.closest(".ch");
    if (span) select(Number(span.dataset.index), { tooltip: true });
  });
  output.addEventListener("keydown", onOutputKey);
  output.addEventListener("blur", hideTooltip);
  $("toggle-attention").addEventListener("click", () => toggleAttention());
  $("layer").addEventListener("change", () => state.attention.has(state.selected) && drawHeatmap(state.selected));
  $("head").addEventListener("change", () => state.attention.has(state.selected) && drawHeatmap(state.selected));
}

wire();
loadInfo();
