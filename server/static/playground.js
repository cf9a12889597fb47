// Kiln playground: a chat and completion page over the server's own OpenAI API.
// Plain browser JavaScript, no dependencies: fetch + a streaming SSE reader, AbortController
// for Stop (closing the connection makes the server abort the request).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { mode: "chat", model: null, history: [], controller: null };

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setModel(id, problem) {
    state.model = id;
    const el = $("model");
    el.textContent = id || problem;
    el.className = "model " + (id ? "ok" : "bad");
    updateButtons();
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      setModel(null, "server unreachable");
      return;
    }
    if (response.status === 401) {
      $("api-key-row").hidden = false;
      setModel(null, $("api-key").value ? "API key rejected" : "API key required");
      return;
    }
    if (!response.ok) {
      setModel(null, "error " + response.status);
      return;
    }
    const body = await response.json();
    setModel(body.data[0].id);
  }

  // The model's request defaults (generation_config.json). An empty temperature field sends
  // none, so the model's default applies; a model without one would sample at OpenAI's 1.0,
  // which small models answer with noise, so the field then starts at 0 (greedy).
  async function loadDefaults() {
    let defaults = {};
    try {
      const response = await fetch("/playground/defaults.json");
      if (response.ok) defaults = await response.json();
    } catch (e) { /* keep the page usable without them */ }
    const field = $("temperature");
    if (defaults.temperature !== undefined) {
      field.placeholder = "model default (" + defaults.temperature + ")";
    } else if (field.value === "") {
      field.value = "0";
      field.title = "this model's generation_config.json sets no temperature; 0 answers greedily";
    }
  }

  function updateButtons() {
    const busy = state.controller !== null;
    $("send").disabled = busy || !state.model;
    $("stop").disabled = !busy;
  }

  function addMessage(role, text) {
    const box = document.createElement("div");
    box.className = "msg " + role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    box.appendChild(body);
    if (role === "assistant") {
      const stats = document.createElement("div");
      stats.className = "stats";
      box.appendChild(stats);
    }
    $("transcript").appendChild(box);
    box.scrollIntoView({ block: "end" });
    return box;
  }

  // Yields the `data:` payload of each server-sent event of a fetch response.
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block.split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || JSON.stringify(body);
    } catch (e) {
      return "HTTP " + response.status;
    }
  }

  function requestBody(prompt) {
    const body = { model: state.model, stream: true, stream_options: { include_usage: true } };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const temperature = $("temperature").value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    if (state.mode === "chat") {
      body.messages = state.history.slice();
    } else {
      body.prompt = prompt;
    }
    return body;
  }

  function showStats(box, run) {
    const tokens = run.usage ? run.usage.completion_tokens : run.pieces;
    const parts = [tokens + (tokens === 1 ? " token" : " tokens")];
    if (run.first !== null) {
      if (tokens > 1 && run.last > run.first) {
        const rate = (tokens - 1) / ((run.last - run.first) / 1000);
        parts.push(rate.toFixed(1) + " tok/s");
      }
      parts.push("TTFT " + Math.round(run.first - run.start) + " ms");
    }
    if (run.finish === "length") parts.push("stopped at max tokens");
    if (run.stopped) parts.push("stopped");
    if (run.error) parts.push("error: " + run.error);
    box.querySelector(".stats").textContent = parts.join(" \u00b7 ");
    if (run.error) box.classList.add("error");
  }

  async function send(prompt) {
    if (state.mode === "chat") state.history.push({ role: "user", content: prompt });
    addMessage("user", prompt);
    const box = addMessage("assistant", "");
    const textEl = box.querySelector(".text");
    const url = state.mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const run = { start: performance.now(), first: null, last: null, pieces: 0, usage: null,
                  finish: null, stopped: false, error: null, text: "" };
    state.controller = new AbortController();
    updateButtons();
    try {
      const response = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(requestBody(prompt)),
                                          signal: state.controller.signal });
      if (!response.ok) {
        run.error = await errorMessage(response);
      } else {
        for await (const data of sseData(response)) {
          if (data === "[DONE]") break;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            run.error = chunk.error.message;
            break;
          }
          if (chunk.usage) run.usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const piece = state.mode === "chat" ? choice.delta && choice.delta.content : choice.text;
            if (piece) {
              const now = performance.now();
              if (run.first === null) run.first = now;
              run.last = now;
              run.pieces += 1;
              run.text += piece;
              textEl.textContent = run.text;
              box.scrollIntoView({ block: "end" });
            }
            if (choice.finish_reason) run.finish = choice.finish_reason;
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") run.stopped = true;
      else run.error = String(e.message || e);
    }
    state.controller = null;
    if (state.mode === "chat") {
      if (run.text) state.history.push({ role: "assistant", content: run.text });
      else state.history.pop();  // nothing came back: forget the question too
    }
    showStats(box, run);
    box.dataset.done = run.stopped ? "stopped" : run.error ? "error" : "finished";
    updateButtons();
  }

  function setMode(mode) {
    if (mode === state.mode) return;
    if (state.controller) state.controller.abort();
    state.mode = mode;
    for (const name of ["chat", "completion"]) {
      const tab = $("mode-" + name);
      tab.classList.toggle("active", name === mode);
      tab.setAttribute("aria-selected", String(name === mode));
    }
    $("input").placeholder = mode === "chat"
      ? "Ask something (Enter sends, Shift+Enter starts a new line)"
      : "A prompt to continue (Enter sends, Shift+Enter starts a new line)";
    clear();
  }

  function clear() {
    state.history = [];
    $("transcript").replaceChildren();
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("input").value;
    if (!prompt.trim() || $("send").disabled) return;
    $("input").value = "";
    send(prompt);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", clear);
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-completion").addEventListener("click", () => setMode("completion"));
  let keyTimer = null;
  $("api-key").addEventListener("input", () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModel, 300);
  });
  loadDefaults();
  loadModel();
})();
