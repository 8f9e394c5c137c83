// tinyGPT playground: streams characters from POST /api/generate, colours each by its
// probability, shows the alternatives the model weighed, and fetches attention weights
// from POST /api/attention for the character you select. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,          // GET /api/info: model config and server limits
  prompt: "",          // the prompt of the current output
  steps: [],           // one {char, prob, top: [{char, prob}]} per generated character
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

function visible(char) {
  if (char === " ") return "␣";
  if (char === "\n") return "↵";
  if (char === "\t") return "⇥";
  return char;
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
    const item = element("li", alt.char === step.char ? "chosen" : "");
    item.append(element("span", "char-name", visible(alt.char)));
    const bar = element("span", "bar");
    bar.style.width = `${Math.max(1, 100 * alt.prob)}%`;
    item.append(bar, element("span", "", percent(alt.prob)));
    list.append(item);
  }
  return list;
}

// ---------------------------------------------------------------------------- start-up

async function loadInfo() {
  const response = await fetch("/api/info");
  if (!response.ok) {
    $("model-info").textContent = `could not load the model: ${await errorMessage(response)}`;
    return;
  }
  const info = await response.json();
  state.info = info;
  const c = info.config;
  $("model-info").textContent =
    `${info.model}: ${(info.parameters / 1e6).toFixed(2)} M parameters, ${c.n_layer} layers × ${c.n_head} heads, ` +
    `context ${c.block_size} characters, ${c.vocab_size} symbols`;
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
  $("details").replaceChildren(element("p", "hint", "No character selected yet."));
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
    const span = element("span", step.char === "\n" ? "ch newline" : "ch", step.char);
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
    const response = await fetch("/api/generate", {
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
    if (error.name === "AbortError") setStatus(`stopped after ${state.steps.length} characters`);
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
        const rate = message.seconds > 0 ? `, ${(message.tokens / message.seconds).toFixed(0)} chars/s` : "";
        setStatus(`${message.tokens} characters${rate}`);
      }
    }
    if (pending.length) appendSteps(pending);
  }
}

// ---------------------------------------------------------------------------- inspecting a character

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
    `Character ${index + 1}: `,
    element("strong", "char-name", visible(step.char)),
    ` — the model gave it ${percent(step.prob)}. Its top ${step.top.length} candidates:`
  );
  $("details").replaceChildren(heading, alternativesList(step));
  if (tooltip) showTooltip(span, step);
  if (!$("attention").hidden) loadAttention();
}

function showTooltip(span, step) {
  const tip = $("tooltip");
  tip.replaceChildren(element("div", "", `${visible(step.char)}  ${percent(step.prob)}`), alternativesList(step));
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
    let context = state.prompt + state.steps.slice(0, index).map((s) => s.char).join("");
    // an empty prompt starts from a newline on the server, so the first character was predicted from one
    if (context === "") context = "\n";
    $("attention-caption").textContent = "loading attention…";
    const response = await fetch("/api/attention", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: context, query: -1 }),
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
  if (result.offset > 0) fragment.append(element("span", "hint", `…${result.offset} earlier characters out of view… `));
  result.tokens.forEach((char, k) => {
    const cell = element("span", char === "\n" ? "cell newline" : "cell", char);
    cell.style.backgroundColor = attentionColour(peak > 0 ? row[k] / peak : 0);
    cell.dataset.weight = row[k];
    cell.title = `${visible(char)}: ${percent(row[k])}`;
    fragment.append(cell);
  });
  const step = state.steps[index];
  fragment.append(element("span", "target", `→ ${visible(step.char)}`));
  $("heatmap").replaceChildren(fragment);
  const headName = head === "mean" ? "all heads (mean)" : `head ${Number(head) + 1}`;
  $("attention-caption").textContent =
    `Layer ${layer + 1}, ${headName}: where the last position looked when predicting character ${index + 1} ` +
    `(“${visible(step.char)}”). Darker: more attention.`;
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
