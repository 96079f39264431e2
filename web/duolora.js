// DuoLoRA front-end extension for ComfyUI.
//  - ZipRank Merge nodes show what a user decides (mode, method, balance, steps) and keep the inputs the server marks
//    "advanced" behind a "show advanced settings" button (the front end's own advanced-widget support; a
//    front end with its own button in Nodes 2.0 mode shows that one instead), a diagram of the SDXL attention
//    blocks coloured by the chosen `prior_preset` (clickable for `custom`, which writes the `custom_prior`
//    widget; shown with the advanced settings) and a live loss curve fed by the server's "duolora.progress"
//    messages, which says when a run was cancelled and shows the server's "duolora.warning" messages.
//  - Save Merged LoRA nodes show the name of the file they saved, the loaders what their file holds.
//  - The pack's templates are listed simplest first (duolora_templates.js).
//  - Nothing else is touched: the Merge Report's preview is ComfyUI's own ui.images preview.
// Widgets are looked up by NAME. Every hook is guarded: a missing widget, an unknown front-end version
// or a page without a canvas makes a feature stay away, never an exception in ComfyUI's hooks.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { CUSTOM, OFF, formatCustomPrior, nextRole, presetRoles } from "./duolora_priors.js";
import { orderTemplates } from "./duolora_templates.js";
import {
  addProgress,
  createAdvancedToggle,
  createLossCurve,
  createPriorDiagram,
  createFileSummary,
  createSavedName,
  drawLoss,
  emptyLossState,
  ensureStyles,
} from "./duolora_widgets.js";

const EXTENSION_NAME = "duolora.frontend";
const VERSION = "0.1.0";
const MERGE_NODE = "DuoLoRA_ZipRankMerge";
const PRESET_WIDGET = "prior_preset";
const CUSTOM_WIDGET = "custom_prior";
const DIAGRAM_WIDGET = "duolora_prior_diagram";
const LOSS_WIDGET = "duolora_loss_curve";
const ADVANCED_WIDGET = "duolora_advanced_toggle";
const SAVE_NODE = "DuoLoRA_SaveMergedLoRA";
const SAVED_WIDGET = "duolora_saved_file";
const LOADER_NODES = ["DuoLoRA_LoadContentLoRA", "DuoLoRA_LoadStyleLoRA"];
const SUMMARY_WIDGET = "duolora_file_summary";
const PROGRESS_EVENT = "duolora.progress";
const DONE_EVENT = "duolora.done";
const WARNING_EVENT = "duolora.warning";
const LOG_PREFIX = "[DuoLoRA]";
// Wide enough for the eleven blocks of the diagram to be legible at 100 % zoom.
const MIN_NODE_WIDTH = 400;

// What a test (or a curious user in the console) can read; nothing in ComfyUI depends on it.
const status = { version: VERSION, loaded: true, setup: false, decorated: 0, progressEvents: 0, templatesOrdered: 0 };
if (typeof window !== "undefined") window.__duolora = status;

function warn(what, error) {
  console.warn(`${LOG_PREFIX} ${what}:`, error);
}

/** A node's widget by name, or null. */
export function findWidget(node, name) {
  const widgets = node?.widgets;
  if (!Array.isArray(widgets)) return null;
  return widgets.find((w) => w?.name === name) ?? null;
}

/** Call `after` each time `obj[key]` (a callback) runs, keeping the original's result. */
function chain(obj, key, after) {
  const original = obj[key];
  obj[key] = function (...args) {
    const result = typeof original === "function" ? original.apply(this, args) : undefined;
    try {
      after.apply(this, args);
    } catch (error) {
      warn(`${key} hook failed`, error);
    }
    return result;
  };
}

function markDirty(node) {
  node?.setDirtyCanvas?.(true, true);
  node?.graph?.setDirtyCanvas?.(true, true);
}

// Forward wheel events over our widgets to the canvas, so zooming still works with the pointer on them.
function forwardWheel(element) {
  element.addEventListener(
    "wheel",
    (event) => {
      const canvas = app?.canvas;
      if (typeof canvas?.processMouseWheel !== "function") return;
      event.preventDefault();
      canvas.processMouseWheel(event);
    },
    { passive: false },
  );
}

function addDomWidget(node, name, element, height, options = {}) {
  if (typeof node.addDOMWidget !== "function") return null;
  const widget = node.addDOMWidget(name, "duolora", element, {
    serialize: false,
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height.min,
    ...(height.max ? { getMaxHeight: () => height.max } : {}),
    ...options,
  });
  // Neither the workflow file (widgets_values) nor the prompt carries our widgets. They must stay
  // LAST in node.widgets: litegraph writes widgets_values[i] at each widget's index but reads the
  // values back packed, so a non-serialised widget in the middle would shift every value after it.
  widget.serialize = false;
  return widget;
}

function decoratePriorDiagram(node) {
  const presetWidget = findWidget(node, PRESET_WIDGET);
  if (!presetWidget) return null;
  let shownKey = null;

  const readState = () => {
    const preset = String(presetWidget.value ?? "");
    const customWidget = findWidget(node, CUSTOM_WIDGET);
    const spec = customWidget ? String(customWidget.value ?? "") : "";
    return { preset, spec, customWidget, ...presetRoles(preset, spec) };
  };

  const refresh = (force = false) => {
    const state = readState();
    const key = `${state.preset}\u0000${state.spec}`;
    if (!force && key === shownKey) return;
    shownKey = key;
    const editable = state.preset === CUSTOM && !!state.customWidget;
    const note = state.preset === CUSTOM && !state.customWidget ? `no '${CUSTOM_WIDGET}' widget` : state.note;
    diagram.render({ preset: state.preset, roles: state.roles, errors: state.errors, editable, note });
  };

  const onBlockClick = (block) => {
    const state = readState();
    if (state.preset !== CUSTOM || !state.customWidget) return;
    const roles = { ...state.roles };
    const role = nextRole(roles[block] ?? OFF);
    if (role === OFF) delete roles[block];
    else roles[block] = role;
    const value = formatCustomPrior(roles);
    const widget = state.customWidget;
    widget.value = value;
    // ComfyUI's own widgets report edits through their callback (litegraph's (value, canvas, node)).
    widget.callback?.call(widget, widget.value, app?.canvas, node);
    refresh(true);
    markDirty(node);
  };

  const diagram = createPriorDiagram(onBlockClick);
  forwardWheel(diagram.element);
  const widget = addDomWidget(node, DIAGRAM_WIDGET, diagram.element, { min: 92, max: 130 });
  if (!widget) return null;
  // Values change through the widgets' callbacks (user edits), configure() (workflow load) or code;
  // the draw hook catches the last kind at the next frame.
  chain(presetWidget, "callback", () => refresh());
  const customWidget = findWidget(node, CUSTOM_WIDGET);
  if (customWidget) chain(customWidget, "callback", () => refresh());
  chain(node, "onConfigure", () => refresh(true));
  widget.options.onDraw = () => refresh();
  refresh(true);
  return { widget, refresh };
}

function decorateLossCurve(node) {
  const curve = createLossCurve();
  forwardWheel(curve.element);
  const widget = addDomWidget(node, LOSS_WIDGET, curve.element, { min: 150 });
  if (!widget) return null;
  const loss = { state: emptyLossState(), canvas: curve.canvas, drawnSize: "" };
  const redraw = () => {
    curve.warning.textContent = loss.state.warning ?? "";
    if (drawLoss(loss.canvas, loss.state)) loss.drawnSize = `${loss.canvas.clientWidth}x${loss.canvas.clientHeight}`;
  };
  loss.redraw = redraw;
  // The element gets its size only once ComfyUI mounts it: redraw whenever that size changes.
  widget.options.onDraw = () => {
    const size = `${loss.canvas.clientWidth}x${loss.canvas.clientHeight}`;
    if (size !== loss.drawnSize) redraw();
  };
  if (typeof ResizeObserver === "function") {
    const observer = new ResizeObserver(() => {
      try {
        redraw();
      } catch (error) {
        warn("loss redraw failed", error);
      }
    });
    observer.observe(curve.canvas);
    chain(node, "onRemoved", () => observer.disconnect());
  }
  return loss;
}

/** The options the server gave a node's input (its /object_info entry), or {}. */
function inputOptions(node, name) {
  const data = node?.constructor?.nodeData;
  const v1 = data?.input?.required?.[name] ?? data?.input?.optional?.[name];
  if (Array.isArray(v1) && v1[1] && typeof v1[1] === "object") return v1[1];
  const v2 = data?.inputs?.[name];
  return v2 && typeof v2 === "object" && !Array.isArray(v2) ? v2 : {};
}

// litegraph draws an advanced widget only while the node's `showAdvanced` is on, and offers "Show Advanced" in
// the node's menu (front ends 1.32.9 to 1.49.6), but still lays it out at full height: the node would keep
// all its height with nothing drawn in it. A hidden advanced widget gets no height here.
function collapseWhenHidden(node, widget) {
  if (!widget || widget.__duoloraCollapses) return;
  widget.__duoloraCollapses = true;
  const hidden = () => !!widget.advanced && !node.showAdvanced;
  if (typeof widget.computeLayoutSize === "function") {
    // DOM widgets share the free space by their layout size.
    const layoutSize = widget.computeLayoutSize;
    widget.computeLayoutSize = function (...args) {
      return hidden() ? { minHeight: 0, maxHeight: 0, minWidth: 0 } : layoutSize.apply(this, args);
    };
    return;
  }
  const computeSize = widget.computeSize;
  widget.computeSize = function (...args) {
    if (hidden()) return [0, -4]; // litegraph adds 4 px of margin to each widget
    if (typeof computeSize === "function") return computeSize.apply(this, args);
    return [args[0] ?? node.size?.[0] ?? 0, window.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20];
  };
}

function markWidgetAdvanced(node, widget) {
  widget.advanced = true;
  collapseWhenHidden(node, widget);
}

// Widgets whose input the server marks "advanced" get the front end's own `advanced` flag (newer front ends
// set it themselves). Returns how many inputs are advanced.
function markAdvanced(node) {
  let count = 0;
  for (const widget of node.widgets ?? []) {
    if (inputOptions(node, widget?.name).advanced) {
      markWidgetAdvanced(node, widget);
      // A seed's "control after generate" widget goes with it.
      for (const linked of widget.linkedWidgets ?? []) markWidgetAdvanced(node, linked);
      count += 1;
    }
  }
  return count;
}

function advancedShown(node) {
  return !!node.showAdvanced;
}

// Set the node's height to what its visible widgets need (shrinking too: hiding the advanced settings should
// give the space back), never narrower.
function fitHeight(node) {
  const size = node.computeSize?.();
  if (!(size?.length >= 2) || !(node.size?.length >= 2)) return;
  node.setSize?.([Math.max(node.size[0], size[0], MIN_NODE_WIDTH), size[1]]);
  markDirty(node);
}

function decorateAdvancedToggle(node) {
  const count = markAdvanced(node);
  // Without litegraph's advanced-widget support (isWidgetVisible) the flag hides nothing: show everything.
  if (!count || typeof node.isWidgetVisible !== "function") return null;
  const toggle = createAdvancedToggle(count, () => {
    try {
      if (typeof node.toggleAdvanced === "function") node.toggleAdvanced();
      else node.showAdvanced = !node.showAdvanced;
    } catch (error) {
      warn("could not toggle the advanced settings", error);
      return;
    }
    toggle.render(advancedShown(node));
    fitHeight(node);
  });
  // canvasOnly: in Nodes 2.0 mode the front end draws nodes itself (with its own advanced button where it
  // has one), and there our button would have nothing to do.
  const widget = addDomWidget(node, ADVANCED_WIDGET, toggle.element, { min: 26, max: 26 }, { canvasOnly: true });
  if (!widget) return null;
  // The node's menu ("Show Advanced") and a loaded workflow set showAdvanced too: follow it when drawn.
  widget.options.onDraw = () => toggle.render(advancedShown(node));
  toggle.render(advancedShown(node));
  return { widget, toggle, count };
}

// A new merge node keeps its seed: ComfyUI's front end would randomize a seed after every run, so each Run
// would merge again and save another file although nothing changed. A loaded workflow then sets its own value.
function fixSeed(node) {
  const control = findWidget(node, "seed")?.linkedWidgets?.find((w) => w?.name === "control_after_generate");
  if (control && control.value !== "fixed") control.value = "fixed";
}

function decorateMergeNode(node) {
  if (node.__duolora) return;
  ensureStyles();
  fixSeed(node);
  const advanced = decorateAdvancedToggle(node);
  const prior = decoratePriorDiagram(node);
  // The diagram shows prior_preset, an advanced setting: it comes and goes with it.
  if (advanced && prior?.widget) markWidgetAdvanced(node, prior.widget);
  const loss = decorateLossCurve(node);
  node.__duolora = { advanced, prior, loss };
  if (advanced && !advancedShown(node)) fitHeight(node);
  growToFit(node);
  // A workflow being loaded sets the saved size after nodeCreated: grow once more after that.
  setTimeout(() => {
    try {
      growToFit(node);
    } catch (error) {
      warn("could not resize the node", error);
    }
  }, 0);
  status.decorated += 1;
}

// Our widgets add height: grow the node (never shrink it) so they do not squeeze ComfyUI's own widgets.
function growToFit(node) {
  const size = node.computeSize?.();
  // node.size is a typed array in current litegraph, a plain array in older ones.
  if (!(size?.length >= 2) || !(node.size?.length >= 2)) return;
  const width = Math.max(node.size[0], size[0], MIN_NODE_WIDTH);
  const height = Math.max(node.size[1], size[1]);
  if (width !== node.size[0] || height !== node.size[1]) {
    node.setSize?.([width, height]);
    markDirty(node);
  }
}

// Save Merged LoRA and the loaders return {"ui": {"text": [one line]}}: the saved file's path relative to the
// loras folder, the file's summary. ComfyUI hands it to onExecuted; the line stays in the node.
function decorateTextLine(node, name, line) {
  if (node.__duolora) return;
  ensureStyles();
  const widget = addDomWidget(node, name, line.element, { min: 36, max: 60 }, { hideOnZoom: false });
  if (!widget) return;
  chain(node, "onExecuted", (output) => {
    const text = Array.isArray(output?.text) ? output.text[0] : output?.text;
    if (typeof text === "string" && text) line.render(text);
  });
  node.__duolora = { line };
  growToFit(node);
  status.decorated += 1;
}

function decorateSaveNode(node) {
  decorateTextLine(node, SAVED_WIDGET, createSavedName());
}

function decorateLoaderNode(node) {
  decorateTextLine(node, SUMMARY_WIDGET, createFileSummary());
}

/**
 * The graph node an execution id names. Top-level nodes are "<id>"; nodes inside a subgraph are
 * "<outer>:<inner>" (ComfyUI's execution ids), which we resolve through the canvas's current graph.
 */
function nodeForExecutionId(executionId) {
  const id = String(executionId ?? "");
  if (!id) return null;
  const root = app?.graph;
  const direct = root?.getNodeById?.(id);
  if (direct) return direct;
  const inner = id.split(":").pop();
  const shown = app?.canvas?.graph;
  if (inner && shown && shown !== root) return shown.getNodeById?.(inner) ?? null;
  return null;
}

function lossOf(executionId) {
  const node = nodeForExecutionId(executionId);
  return node?.comfyClass === MERGE_NODE ? (node.__duolora?.loss ?? null) : null;
}

function onProgress(event) {
  status.progressEvents += 1;
  const data = event?.detail;
  const loss = lossOf(data?.node);
  if (!loss) return;
  if (addProgress(loss.state, data)) loss.redraw();
}

function onDone(event) {
  const data = event?.detail;
  const loss = lossOf(data?.node);
  if (!loss) return;
  loss.state.done = true;
  loss.state.keptRank = data?.kept_rank ?? null;
  loss.redraw();
}

// A warning from the server that does not stop the merge: on the node, and as a toast where the front end
// has toasts.
function onWarning(event) {
  const data = event?.detail;
  const message = typeof data?.message === "string" ? data.message : "";
  if (!message) return;
  const loss = lossOf(data?.node);
  if (loss) {
    loss.state.warning = message;
    loss.redraw();
  }
  try {
    app?.extensionManager?.toast?.add?.({ severity: "warn", summary: "DuoLoRA", detail: message, life: 15000 });
  } catch (error) {
    warn("could not show a toast", error);
  }
}

// Cancel stops the prompt in the node that runs: its curve says so instead of stopping at "step 7 / 80".
function onInterrupted(event) {
  const loss = lossOf(event?.detail?.node_id);
  if (!loss || loss.state.done) return;
  loss.state.cancelled = true;
  loss.redraw();
}

// "executing" names the node that starts running: a new run of a merge node clears its curve.
function onExecuting(event) {
  const loss = lossOf(event?.detail);
  if (!loss) return;
  loss.state = emptyLossState();
  loss.redraw();
}

app.registerExtension({
  name: EXTENSION_NAME,
  setup() {
    try {
      api.addEventListener(PROGRESS_EVENT, onProgress);
      api.addEventListener(DONE_EVENT, onDone);
      api.addEventListener(WARNING_EVENT, onWarning);
      api.addEventListener("executing", onExecuting);
      api.addEventListener("execution_interrupted", onInterrupted);
      status.setup = true;
    } catch (error) {
      warn("could not listen to server messages", error);
    }
  },
  nodeCreated(node) {
    const decorate = {
      [MERGE_NODE]: decorateMergeNode,
      [SAVE_NODE]: decorateSaveNode,
      ...Object.fromEntries(LOADER_NODES.map((type) => [type, decorateLoaderNode])),
    }[node?.comfyClass];
    if (!decorate) return;
    try {
      decorate(node);
    } catch (error) {
      warn(`could not add the DuoLoRA widgets to node ${node?.id}`, error);
    }
  },
});

// The server lists a pack's templates in directory order: order ours simplest first in every answer the
// template browser gets (this module runs before the browser first asks).
try {
  const original = api.getWorkflowTemplates;
  if (typeof original === "function") {
    api.getWorkflowTemplates = async function (...args) {
      const templates = await original.apply(this, args);
      try {
        if (orderTemplates(templates)) status.templatesOrdered += 1;
      } catch (error) {
        warn("could not order the templates", error);
      }
      return templates;
    };
  }
} catch (error) {
  warn("could not hook the template list", error);
}

console.log(`${LOG_PREFIX} front-end extension ${VERSION} loaded`);
