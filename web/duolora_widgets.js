// DOM pieces of the DuoLoRA front end: the layer-prior diagram (SVG) and the live loss curve (canvas).
// No ComfyUI imports: duolora.js wires these into nodes. Every function tolerates a missing DOM
// (headless runs, a canvas without a 2-D context) by doing nothing.

import { ATTENTION_BLOCKS, CONTENT, CUSTOM, OFF, STYLE } from "./duolora_priors.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const STYLE_ELEMENT_ID = "duolora-styles";

export const ROLE_COLOURS = { [CONTENT]: "#3b82f6", [STYLE]: "#f97316", [OFF]: "#3a3a3a" };
// Loss series colours: the paper's three terms first, anything else the node reports after them.
const SERIES_COLOURS = {
  total: "#e5e7eb",
  content: ROLE_COLOURS[CONTENT],
  style: ROLE_COLOURS[STYLE],
  cycle: "#a855f7",
};
const EXTRA_COLOURS = ["#22c55e", "#eab308", "#ec4899", "#14b8a6", "#94a3b8"];
const MAX_POINTS = 4000;

const CSS = `
.duolora-prior, .duolora-loss {
  box-sizing: border-box; display: flex; flex-direction: column; gap: 2px;
  padding: 4px 6px; border-radius: 6px; overflow: hidden;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  font: 11px/1.3 system-ui, sans-serif;
}
.duolora-prior svg { flex: 1 1 auto; min-height: 0; width: 100%; display: block; }
.duolora-prior .duolora-block { cursor: default; }
.duolora-prior[data-editable="true"] .duolora-block { cursor: pointer; }
.duolora-prior[data-editable="true"] .duolora-block:hover rect { stroke: #fff; stroke-width: 1.5; }
.duolora-prior-caption { flex: 0 0 auto; color: var(--descrip-text, #999); white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.duolora-prior-caption .duolora-swatch { display: inline-block; width: 8px; height: 8px;
  border-radius: 2px; margin: 0 3px 0 6px; vertical-align: baseline; }
.duolora-prior-error { color: var(--error-text, #f87171); }
.duolora-loss canvas { flex: 1 1 auto; min-height: 0; width: 100%; display: block; }
.duolora-loss-warning { flex: 0 0 auto; color: #fbbf24; white-space: normal; }
.duolora-loss-warning:empty { display: none; }
.duolora-advanced { box-sizing: border-box; width: 100%; height: 100%; margin: 0; padding: 2px 8px;
  border: 1px dashed var(--border-color, #555); border-radius: 6px; cursor: pointer; text-align: left;
  background: transparent; color: var(--descrip-text, #aaa); font: 12px/1.2 system-ui, sans-serif; }
.duolora-advanced:hover { color: var(--input-text, #ddd); border-style: solid; }
.duolora-saved { box-sizing: border-box; padding: 4px 6px; border-radius: 6px; overflow-wrap: anywhere;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); font: 12px/1.3 system-ui, sans-serif; }
.duolora-saved[data-saved="false"] { color: var(--descrip-text, #999); }
`;

/** Add the pack's stylesheet to the page once. */
export function ensureStyles() {
  if (typeof document === "undefined" || document.getElementById(STYLE_ELEMENT_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ELEMENT_ID;
  style.textContent = CSS;
  document.head?.appendChild(style);
}

function svgElement(tag, attributes) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
  return el;
}

// Diagram geometry (SVG user units): one column per block in data-flow order, high-resolution blocks on
// the top row and low-resolution ones on the bottom row, so the UNet's U shape is visible.
const COL = 29;
const LEFT = 22;
const BOX_W = 26;
const BOX_H = 18;
const ROW_Y = { 64: 6, 32: 36 };
const VIEW_W = LEFT + COL * ATTENTION_BLOCKS.length + 2;
const VIEW_H = 58;

/**
 * Build the prior diagram. `onBlockClick(blockName)` is called for a click on a block.
 * @returns {{element: HTMLElement, render: (state: {preset: string, roles: Object, errors: string[],
 *           editable: boolean, note?: string}) => void}}
 */
export function createPriorDiagram(onBlockClick) {
  const root = document.createElement("div");
  root.className = "duolora-prior";
  const svg = svgElement("svg", {
    viewBox: `0 0 ${VIEW_W} ${VIEW_H}`,
    preserveAspectRatio: "xMidYMid meet",
    role: "img",
  });
  const title = svgElement("title", {});
  title.textContent = "SDXL UNet attention blocks and their layer prior";
  svg.appendChild(title);

  for (const [res, y] of Object.entries(ROW_Y)) {
    const label = svgElement("text", { x: 1, y: y + BOX_H / 2 + 3, "font-size": 8, fill: "currentColor" });
    label.textContent = `${res}²`;
    label.setAttribute("opacity", "0.6");
    svg.appendChild(label);
  }
  // The data path through the blocks (down, middle, up).
  const points = ATTENTION_BLOCKS.map((b, i) => `${LEFT + i * COL + BOX_W / 2},${ROW_Y[b.res] + BOX_H / 2}`);
  svg.appendChild(
    svgElement("polyline", {
      points: points.join(" "),
      fill: "none",
      stroke: "currentColor",
      "stroke-opacity": 0.35,
      "stroke-width": 1.2,
    }),
  );

  const groups = new Map();
  ATTENTION_BLOCKS.forEach((block, i) => {
    const x = LEFT + i * COL;
    const y = ROW_Y[block.res];
    const g = svgElement("g", { class: "duolora-block", "data-block": block.name, "data-role": OFF });
    const tip = svgElement("title", {});
    g.appendChild(tip);
    g.appendChild(svgElement("rect", { x, y, width: BOX_W, height: BOX_H, rx: 3, fill: ROLE_COLOURS[OFF] }));
    const text = svgElement("text", {
      x: x + BOX_W / 2,
      y: y + BOX_H / 2 + 3,
      "text-anchor": "middle",
      "font-size": 8,
      fill: "#fff",
      "pointer-events": "none",
    });
    text.textContent = block.short;
    g.appendChild(text);
    svg.appendChild(g);
    groups.set(block.name, { g, tip, text, rect: g.querySelector("rect") });
  });
  root.appendChild(svg);

  const caption = document.createElement("div");
  caption.className = "duolora-prior-caption";
  root.appendChild(caption);

  svg.addEventListener("click", (event) => {
    const target = event.target?.closest?.("[data-block]");
    if (!target) return;
    event.stopPropagation();
    onBlockClick?.(target.getAttribute("data-block"));
  });

  function render({ preset, roles, errors, editable, note }) {
    root.dataset.preset = String(preset ?? "");
    root.dataset.editable = editable ? "true" : "false";
    const counts = { [CONTENT]: 0, [STYLE]: 0, [OFF]: 0 };
    for (const block of ATTENTION_BLOCKS) {
      const role = roles?.[block.name] ?? OFF;
      counts[role] = (counts[role] ?? 0) + 1;
      const parts = groups.get(block.name);
      parts.g.setAttribute("data-role", role);
      parts.rect.setAttribute("fill", ROLE_COLOURS[role] ?? ROLE_COLOURS[OFF]);
      parts.rect.setAttribute("stroke", role === OFF ? "#777" : "none");
      parts.text.setAttribute("fill", role === OFF ? "#aaa" : "#fff");
      parts.tip.textContent =
        `${block.name} (${block.res}×${block.res} latent): ${role}` +
        (editable ? " — click: content → style → off" : "");
    }
    caption.replaceChildren();
    const legend = [
      [CONTENT, counts[CONTENT]],
      [STYLE, counts[STYLE]],
      [OFF, counts[OFF]],
    ];
    for (const [role, n] of legend) {
      const swatch = document.createElement("span");
      swatch.className = "duolora-swatch";
      swatch.style.background = ROLE_COLOURS[role];
      caption.appendChild(swatch);
      caption.appendChild(document.createTextNode(`${role} ${n}`));
    }
    const hint = note ?? (preset === CUSTOM ? "click a block to change it" : "choose 'custom' to edit");
    caption.appendChild(document.createTextNode(` · ${hint}`));
    if (errors?.length) {
      const err = document.createElement("div");
      err.className = "duolora-prior-error";
      err.textContent = errors.join("; ");
      caption.appendChild(err);
    }
  }

  return { element: root, render };
}

/**
 * The switch for a node's advanced settings: a real button (keyboard and screen readers reach it).
 * @param {number} count how many settings it shows and hides
 * @param {() => void} onToggle
 * @returns {{element: HTMLButtonElement, render: (shown: boolean) => void}}
 */
export function createAdvancedToggle(count, onToggle) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "duolora-advanced";
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    onToggle?.();
  });
  // The canvas would start a drag on pointerdown: the button keeps it.
  button.addEventListener("pointerdown", (event) => event.stopPropagation());
  const render = (shown) => {
    const text = shown ? `▾ Hide the ${count} advanced settings` : `▸ Show ${count} advanced settings`;
    if (button.textContent === text) return;
    button.textContent = text;
    button.setAttribute("aria-expanded", shown ? "true" : "false");
  };
  render(false);
  return { element: button, render };
}

function createTextLine(placeholder, format) {
  const root = document.createElement("div");
  root.className = "duolora-saved";
  root.setAttribute("role", "status");
  root.dataset.saved = "false";
  root.textContent = placeholder;
  const render = (text) => {
    root.dataset.saved = "true";
    root.textContent = format(text);
    root.title = text;
  };
  return { element: root, render };
}

/**
 * The line in Save Merged LoRA that says which file the last run wrote.
 * @returns {{element: HTMLElement, render: (name: string) => void}}
 */
export function createSavedName() {
  return createTextLine("After a run, the saved file's name appears here.",
    (name) => `Saved in your loras folder as ${name} (press R to list it in Load LoRA)`);
}

/**
 * The line in a loader that says what its file holds (key style, base model, layers, rank).
 * @returns {{element: HTMLElement, render: (summary: string) => void}}
 */
export function createFileSummary() {
  return createTextLine("After a run, what the file holds appears here.", (summary) => summary);
}

/** The empty state of a loss curve (no run seen yet). */
export function emptyLossState() {
  return { steps: [], series: {}, total: 0, lastStep: -1, done: false, cancelled: false, keptRank: null, warning: "" };
}

/**
 * Add one "duolora.progress" message to a loss state; a step not after the last one starts a new run.
 * @param {{steps: number[], series: Object<string, number[]>}} state
 * @param {{step: number, total: number, losses: Object<string, number>}} data
 * @returns {boolean} false if the message had nothing usable
 */
export function addProgress(state, data) {
  const step = Number(data?.step);
  if (!Number.isFinite(step)) return false;
  if (step <= state.lastStep || state.done || state.cancelled) Object.assign(state, emptyLossState());
  state.lastStep = step;
  state.total = Number.isFinite(Number(data?.total)) ? Number(data.total) : state.total;
  const index = state.steps.length;
  state.steps.push(step);
  const losses = data?.losses && typeof data.losses === "object" ? data.losses : {};
  for (const [name, value] of Object.entries(losses)) {
    if (!state.series[name]) state.series[name] = new Array(index).fill(NaN);
    state.series[name].push(Number(value));
  }
  for (const values of Object.values(state.series)) {
    if (values.length < state.steps.length) values.push(NaN);
  }
  if (state.steps.length > MAX_POINTS) {
    // Keep every other point: the curve's shape survives and memory stays bounded for long runs.
    state.steps = state.steps.filter((_, i) => i % 2 === 0);
    for (const name of Object.keys(state.series)) {
      state.series[name] = state.series[name].filter((_, i) => i % 2 === 0);
    }
  }
  return true;
}

function seriesOrder(names) {
  const known = Object.keys(SERIES_COLOURS).filter((n) => names.includes(n));
  return [...known, ...names.filter((n) => !known.includes(n))];
}

function seriesColour(name, extraIndex) {
  return SERIES_COLOURS[name] ?? EXTRA_COLOURS[extraIndex % EXTRA_COLOURS.length];
}

function formatLoss(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toPrecision(3);
}

/**
 * A short summary of "duolora.done"'s kept_rank: {block: {content, style, ...}} (the merge node's shape)
 * gives the mean kept rank over blocks of each LoRA (content, content2, … for several subjects, style); a flat
 * {name: number} gives their sum.
 */
export function keptRankText(keptRank) {
  if (!keptRank || typeof keptRank !== "object") return "";
  const sums = {};
  const counts = {};
  let flat = 0;
  let flatCount = 0;
  for (const value of Object.values(keptRank)) {
    if (typeof value === "number" && Number.isFinite(value)) {
      flat += value;
      flatCount += 1;
    } else if (value && typeof value === "object") {
      for (const [role, raw] of Object.entries(value)) {
        if (!/^(content\d*|style)$/.test(role)) continue;
        const v = Number(raw);
        if (Number.isFinite(v)) {
          sums[role] = (sums[role] ?? 0) + v;
          counts[role] = (counts[role] ?? 0) + 1;
        }
      }
    }
  }
  if (counts.content || counts.style) {
    const more = Object.keys(counts).filter((r) => /^content\d+$/.test(r))
      .sort((a, b) => Number(a.slice(7)) - Number(b.slice(7)));
    const mean = (role) => (counts[role] ? formatLoss(sums[role] / counts[role]) : "–");
    return " · mean kept rank: " + ["content", ...more, "style"].map((r) => `${r} ${mean(r)}`).join(", ");
  }
  return flatCount ? ` · kept rank ${formatLoss(flat)}` : "";
}

/** Build the loss-curve element: a canvas sized by CSS and redrawn by {@link drawLoss}. */
export function createLossCurve() {
  const root = document.createElement("div");
  root.className = "duolora-loss";
  const warning = document.createElement("div");
  warning.className = "duolora-loss-warning";
  warning.setAttribute("role", "alert");
  root.appendChild(warning);
  const canvas = document.createElement("canvas");
  canvas.className = "duolora-loss-canvas";
  canvas.dataset.points = "0";
  root.appendChild(canvas);
  return { element: root, canvas, warning };
}

/**
 * Draw a loss state on a canvas: one line per loss term, log scale when every value is positive,
 * a header with step/total and the latest values. Sets canvas.dataset.points to the points drawn.
 * @returns {boolean} true if something was drawn (false while the canvas has no size yet)
 */
export function drawLoss(canvas, state) {
  const ctx = canvas?.getContext?.("2d");
  if (!ctx) return false;
  const ratio = (typeof window !== "undefined" && window.devicePixelRatio) || 1;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  if (!cssW || !cssH) return false;
  if (canvas.width !== Math.round(cssW * ratio) || canvas.height !== Math.round(cssH * ratio)) {
    canvas.width = Math.round(cssW * ratio);
    canvas.height = Math.round(cssH * ratio);
  }
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const fg = getComputedStyle(canvas).color || "#ddd";
  ctx.font = "10px system-ui, sans-serif";
  ctx.textBaseline = "top";

  const names = seriesOrder(Object.keys(state.series));
  const n = state.steps.length;
  const header = n
    ? `loss · step ${state.lastStep}${state.total ? ` / ${state.total}` : ""}` +
      (state.done ? ` · done${keptRankText(state.keptRank)}` : "") +
      (state.cancelled ? " · cancelled" : "")
    : state.cancelled
      ? "loss · cancelled before the first step"
      : state.done
        ? `merged${keptRankText(state.keptRank)}`
        : "loss · the curve appears while the merge runs";
  // A canvas has no text: the header doubles as its accessible name.
  canvas.setAttribute("aria-label", header);
  ctx.fillStyle = fg;
  ctx.globalAlpha = 0.85;
  ctx.fillText(header, 2, 1);
  ctx.globalAlpha = 1;

  // Legend from the second line on, wrapped to the canvas width: colour, name, latest value.
  let x = 2;
  let y = 13;
  let extra = 0;
  const colours = {};
  for (const name of names) {
    const colour = seriesColour(name, SERIES_COLOURS[name] ? 0 : extra++);
    colours[name] = colour;
    const values = state.series[name];
    const label = `${name} ${formatLoss(values[values.length - 1])}`;
    const width = 11 + ctx.measureText(label).width + 8;
    if (x > 2 && x + width > cssW) {
      x = 2;
      y += 12;
    }
    ctx.fillStyle = colour;
    ctx.fillRect(x, y + 3, 8, 3);
    ctx.fillStyle = fg;
    ctx.fillText(label, x + 11, y);
    x += width;
  }
  // What is on the canvas, for tests and for anyone inspecting the page (a canvas has no text to read).
  canvas.dataset.points = "0";
  canvas.dataset.step = n ? String(state.lastStep) : "";
  canvas.dataset.done = state.done ? "true" : "false";
  canvas.dataset.cancelled = state.cancelled ? "true" : "false";
  if (!n) return true;

  const plot = { left: 38, top: y + 15, right: cssW - 4, bottom: cssH - 12 };
  if (plot.right - plot.left < 10 || plot.bottom - plot.top < 10) return true;
  let lo = Infinity;
  let hi = -Infinity;
  let allPositive = true;
  for (const name of names) {
    for (const v of state.series[name]) {
      if (!Number.isFinite(v)) continue;
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
      if (v <= 0) allPositive = false;
    }
  }
  if (!Number.isFinite(lo)) return true;
  // Loss terms differ by orders of magnitude: a log axis keeps every term readable.
  const useLog = allPositive && hi / lo > 20;
  const tf = useLog ? Math.log10 : (v) => v;
  let yLo = tf(lo);
  let yHi = tf(hi);
  if (yHi - yLo < 1e-12) {
    yLo -= 0.5;
    yHi += 0.5;
  }
  const xMax = Math.max(state.total || 0, state.steps[n - 1], 1);
  const xMin = Math.min(state.steps[0], 0);
  const px = (s) => plot.left + ((s - xMin) / (xMax - xMin || 1)) * (plot.right - plot.left);
  const py = (v) => plot.bottom - ((tf(v) - yLo) / (yHi - yLo)) * (plot.bottom - plot.top);

  ctx.strokeStyle = fg;
  ctx.globalAlpha = 0.3;
  ctx.lineWidth = 1;
  ctx.strokeRect(plot.left, plot.top, plot.right - plot.left, plot.bottom - plot.top);
  ctx.globalAlpha = 0.7;
  ctx.fillStyle = fg;
  ctx.textAlign = "right";
  ctx.fillText(formatLoss(hi), plot.left - 3, plot.top - 1);
  ctx.textBaseline = "bottom";
  ctx.fillText(formatLoss(lo), plot.left - 3, plot.bottom + 1);
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(useLog ? "log" : "", 2, plot.top + (plot.bottom - plot.top) / 2 - 5);
  ctx.fillText(String(xMin), plot.left, plot.bottom + 1);
  ctx.textAlign = "right";
  ctx.fillText(String(xMax), plot.right, plot.bottom + 1);
  ctx.textAlign = "left";
  ctx.globalAlpha = 1;

  let drawn = 0;
  ctx.lineWidth = 1.5;
  ctx.lineJoin = "round";
  for (const name of names) {
    const values = state.series[name];
    ctx.strokeStyle = colours[name];
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < n; i++) {
      const v = values[i];
      if (!Number.isFinite(v)) {
        pen = false;
        continue;
      }
      const cx = px(state.steps[i]);
      const cy = py(v);
      if (pen) ctx.lineTo(cx, cy);
      else ctx.moveTo(cx, cy);
      pen = true;
      drawn += 1;
    }
    if (n === 1 && Number.isFinite(values[0])) {
      ctx.fillStyle = colours[name];
      ctx.fillRect(px(state.steps[0]) - 1.5, py(values[0]) - 1.5, 3, 3);
    }
    ctx.stroke();
  }
  canvas.dataset.points = String(drawn);
  return true;
}
