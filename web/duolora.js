// DuoLoRA front-end extension for ComfyUI.
//  - ZipRank Merge nodes get a diagram of the SDXL attention blocks coloured by the chosen `prior_preset`
//    (clickable for `custom`, which writes the `custom_prior` widget) and a live loss curve fed by the
//    server's "duolora.progress" messages.
//  - Nothing else is touched: the Merge Report's preview is ComfyUI's own ui.images preview.
// Widgets are looked up by NAME. Every hook is guarded: a missing widget, an unknown front-end version
// or a page without a canvas makes a feature stay away, never an exception in ComfyUI's hooks.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { CUSTOM, OFF, formatCustomPrior, nextRole, presetRoles } from "./duolora_priors.js";
import {
  addProgress,
  createLossCurve,
  createPriorDiagram,
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
const PROGRESS_EVENT = "duolora.progress";
const DONE_EVENT = "duolora.done";
const LOG_PREFIX = "[DuoLoRA]";
// Wide enough for the eleven blocks of the diagram to be legible at 100 % zoom.
const MIN_NODE_WIDTH = 400;

// What a test (or a curious user in the console) can read; nothing in ComfyUI depends on it.
const status = { version: VERSION, loaded: true, setup: false, decorated: 0, progressEvents: 0 };
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

function addDomWidget(node, name, element, height) {
  if (typeof node.addDOMWidget !== "function") return null;
  const widget = node.addDOMWidget(name, "duolora", element, {
    serialize: false,
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height.min,
    ...(height.max ? { getMaxHeight: () => height.max } : {}),
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
    const note = state.preset === CUSTOM && !state.customWidget ? `no '${CUSTOM_WIDGET}' widget` : undefined;
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

function decorateMergeNode(node) {
  if (node.__duolora) return;
  ensureStyles();
  const prior = decoratePriorDiagram(node);
  const loss = decorateLossCurve(node);
  node.__duolora = { prior, loss };
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
      api.addEventListener("executing", onExecuting);
      status.setup = true;
    } catch (error) {
      warn("could not listen to server messages", error);
    }
  },
  nodeCreated(node) {
    if (node?.comfyClass !== MERGE_NODE) return;
    try {
      decorateMergeNode(node);
    } catch (error) {
      warn(`could not add the DuoLoRA widgets to node ${node?.id}`, error);
    }
  },
});

console.log(`${LOG_PREFIX} front-end extension ${VERSION} loaded`);
