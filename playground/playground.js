// The playground's behaviour. Everything the API returns is rendered as text nodes (never as
// HTML), requests go to this origin only, and the function key lives in sessionStorage only.
"use strict";

(function () {
  const KEY_STORAGE = "qa-playground-function-key";
  const MAX_RETRIES = 3; // automatic retries of a 503, each after its Retry-After
  const MAX_RETRY_WAIT = 30; // seconds; a longer Retry-After is cut to this
  const WARM_POLLS = 30; // health checks after "Warm up", 2 s apart

  // The API's routes, relative to this script (/api/playground/playground.js -> /api/), so that
  // they resolve the same whatever URL the page itself was loaded from.
  const API = new URL("../", document.currentScript.src);
  const api = (route) => new URL(route, API).toString();

  const $ = (id) => document.getElementById(id);
  const form = $("ask-form");
  const keyInput = $("key");
  const statusLine = $("status");
  const errorBox = $("error");
  const result = $("result");

  // --- offsets --------------------------------------------------------------------------------
  // The API's start/end count Unicode code points; JavaScript strings index UTF-16 code units,
  // where a character outside the Basic Multilingual Plane (an emoji) takes two.
  function codePointToUtf16(text, codePoints) {
    let units = 0;
    let seen = 0;
    for (const ch of text) {
      if (seen === codePoints) break;
      units += ch.length;
      seen += 1;
    }
    return units;
  }

  // --- rendering (text nodes only) ------------------------------------------------------------
  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function hideError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function highlight(context, answer) {
    const target = $("highlight");
    clear(target);
    const start = codePointToUtf16(context, answer.start);
    const end = codePointToUtf16(context, answer.end);
    target.appendChild(document.createTextNode(context.slice(0, start)));
    const mark = element("mark", "", context.slice(start, end));
    target.appendChild(mark);
    target.appendChild(document.createTextNode(context.slice(end)));
  }

  // A score is not a percentage: the pipeline sums a span's probabilities over the overlapping
  // windows that found it, so it can exceed 1. It is shown as the number it is; the bar is its
  // length relative to the best answer's score.
  function formatScore(score) {
    return score >= 0.01 || score === 0 ? score.toFixed(2) : score.toExponential(1);
  }

  function renderAnswers(answers) {
    const list = $("answers");
    clear(list);
    const best = Math.max(0, ...answers.map((answer) => answer.score));
    for (const answer of answers) {
      const item = element("li");
      item.appendChild(element("span", "text", answer.answer === "" ? "(no answer)" : answer.answer));
      item.appendChild(document.createTextNode(" "));
      item.appendChild(element("span", "score", "score " + formatScore(answer.score)));
      const bar = element("span", "bar");
      bar.setAttribute("aria-hidden", "true");
      const fill = element("span");
      const relative = best > 0 ? Math.max(0, Math.min(100, (answer.score / best) * 100)) : 0;
      fill.style.width = relative.toFixed(1) + "%"; // CSSOM, allowed by the page's CSP
      bar.appendChild(fill);
      item.appendChild(bar);
      list.appendChild(item);
    }
  }

  function renderMeta(body, serverMs, roundTripMs) {
    const meta = $("meta");
    clear(meta);
    const rows = [
      ["Model", body.model_id],
      ["Revision", body.revision],
      ["Backend", body.backend === undefined ? "-" : body.backend + (body.variant ? " (" + body.variant + ")" : "")],
      ["Server time", serverMs === null ? "-" : serverMs.toFixed(1) + " ms (model)"],
      ["Round trip", roundTripMs.toFixed(0) + " ms"],
    ];
    for (const [name, value] of rows) {
      meta.appendChild(element("dt", "", name));
      meta.appendChild(element("dd", "", value === undefined || value === null ? "-" : String(value)));
    }
  }

  function serverTiming(response) {
    const header = response.headers.get("Server-Timing") || "";
    const match = /(?:^|,)\s*model\s*;\s*dur=([0-9.]+)/.exec(header);
    return match ? Number(match[1]) : null;
  }

  // --- errors ---------------------------------------------------------------------------------
  async function describeError(response) {
    const text = await response.text();
    let message = null;
    try {
      const body = JSON.parse(text);
      if (body && body.error && typeof body.error.message === "string") {
        message = body.error.code + ": " + body.error.message;
      }
    } catch (err) {
      message = null; // not JSON: the host's own answer (401 has an empty body)
    }
    if (message === null) {
      if (response.status === 401) {
        message = "the function key is missing or wrong (the Functions host answered 401 with an empty body)";
      } else {
        message = text.trim() ? text.trim().slice(0, 300) : "the server sent no details";
      }
    }
    return "HTTP " + response.status + " " + message;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // --- top_k, checked as the API checks it (bounds from the OpenAPI document) -------------------
  const topK = { min: 1, max: 20 };

  // The top_k to send: null for the API's default (empty field), or an error message naming the field.
  function readTopK() {
    const input = $("top-k");
    const raw = input.value.trim();
    if (raw === "" && !input.validity.badInput) return { value: null };
    const value = Number(raw);
    if (input.validity.badInput || raw === "" || !Number.isInteger(value)) {
      return { error: "'top_k' must be a whole number" };
    }
    if (value < topK.min || value > topK.max) {
      return { error: "'top_k' must be between " + topK.min + " and " + topK.max + ", got " + value };
    }
    return { value: value };
  }

  // The answer (or the error) below the form is out of sight on a phone: bring it into view.
  function reveal(target, focus) {
    target.scrollIntoView({ block: "start", behavior: "auto" });
    if (focus) focus.focus({ preventScroll: true });
  }

  // --- ask ------------------------------------------------------------------------------------
  async function ask(event) {
    event.preventDefault();
    const topKInput = $("top-k");
    const checked = readTopK();
    if (checked.error) {
      topKInput.setAttribute("aria-invalid", "true");
      result.hidden = true;
      showError(checked.error);
      statusLine.textContent = "Not sent: fix top_k.";
      topKInput.focus();
      return;
    }
    topKInput.removeAttribute("aria-invalid");
    const key = keyInput.value.trim();
    if (key) {
      sessionStorage.setItem(KEY_STORAGE, key);
    } else {
      sessionStorage.removeItem(KEY_STORAGE);
    }
    const context = $("context").value;
    const question = $("question").value;
    const payload = { question: question, context: context };
    if (checked.value !== null) payload.top_k = checked.value;
    const headers = { "Content-Type": "application/json" };
    if (key) headers["x-functions-key"] = key; // a header, never the URL
    const button = $("submit");
    button.disabled = true;
    hideError();
    result.hidden = true;
    try {
      for (let attempt = 0; ; attempt += 1) {
        statusLine.textContent = "Asking…";
        const started = performance.now();
        const response = await fetch(api("ask"), {
          method: "POST",
          headers: headers,
          body: JSON.stringify(payload),
          credentials: "omit",
          cache: "no-store",
        });
        const roundTrip = performance.now() - started;
        if (response.ok) {
          const body = await response.json();
          const answers = body.answers || [{ answer: body.answer, score: body.score, start: body.start, end: body.end }];
          if (answers.length > 0) {
            highlight(context, answers[0]);
          } else {
            clear($("highlight"));
            $("highlight").textContent = "No answer found.";
          }
          renderAnswers(answers);
          renderMeta(body, serverTiming(response), roundTrip);
          result.hidden = false;
          statusLine.textContent = "Answered.";
          reveal($("result-card"), $("result-title"));
          return;
        }
        const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10);
        const message = await describeError(response);
        if (response.status === 503 && Number.isInteger(retryAfter) && attempt < MAX_RETRIES) {
          const wait = Math.max(1, Math.min(retryAfter, MAX_RETRY_WAIT));
          showError(message);
          for (let left = wait; left > 0; left -= 1) {
            statusLine.textContent = "Retrying in " + left + " s (retry " + (attempt + 1) + " of " + MAX_RETRIES + ")…";
            await sleep(1000);
          }
          continue;
        }
        showError(message);
        statusLine.textContent = "Failed.";
        reveal($("result-card"), null);
        return;
      }
    } catch (err) {
      showError("The request did not reach the app: " + (err && err.message ? err.message : String(err)));
      statusLine.textContent = "Failed.";
    } finally {
      button.disabled = false;
    }
  }

  // --- health ---------------------------------------------------------------------------------
  async function health(warm) {
    const target = $("health");
    try {
      const response = await fetch(api(warm ? "health?warm=1" : "health"), { cache: "no-store", credentials: "omit" });
      const body = await response.json();
      clear(target);
      target.appendChild(document.createTextNode("State: "));
      target.appendChild(element("span", "state", body.state + (body.degraded ? " (degraded)" : "")));
      if (body.revision) {
        target.appendChild(document.createTextNode(" · " + (body.model_id || "") + " @ " + body.revision.slice(0, 12)));
      }
      if (typeof body.load_seconds === "number") {
        target.appendChild(document.createTextNode(" · loaded in " + body.load_seconds.toFixed(1) + " s"));
      }
      return body.state;
    } catch (err) {
      target.textContent = "State: unknown (the health check failed)";
      return "unknown";
    }
  }

  async function warmUp() {
    const button = $("warm");
    button.disabled = true;
    try {
      let state = await health(true);
      for (let i = 0; i < WARM_POLLS && state !== "ready" && state !== "error"; i += 1) {
        await sleep(2000);
        state = await health(false);
      }
    } finally {
      button.disabled = false;
    }
  }

  // --- limits from the OpenAPI document -------------------------------------------------------
  async function applyLimits() {
    try {
      const response = await fetch(api("openapi.json"), { cache: "no-store", credentials: "omit" });
      const doc = await response.json();
      const limits = doc.info["x-limits"];
      const schema = doc.components.schemas.AskItem.properties.top_k;
      topK.min = schema.minimum;
      topK.max = schema.maximum;
      $("context").maxLength = limits.max_context_chars;
      $("question").maxLength = limits.max_question_chars;
      $("top-k").min = String(topK.min);
      $("top-k").max = String(topK.max);
      $("top-k-hint").textContent = "A whole number from " + topK.min + " to " + topK.max + ".";
      $("context-hint").textContent = "The text to search, up to " + limits.max_context_chars + " characters.";
    } catch (err) {
      // the page works without the limits; the API still enforces them
    }
  }

  keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  form.addEventListener("submit", ask);
  $("warm").addEventListener("click", warmUp);
  health(false);
  applyLimits();
})();
