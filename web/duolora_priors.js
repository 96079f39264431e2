// SDXL attention blocks and the layer-prior presets of DuoLoRA (docs/method.md §3), for the front end.
// Pure data and functions: no DOM, no ComfyUI imports, so any page (or a test) can import this module.
//
// The PRESETS table below is a copy of duolora/sdxl.py PRESETS. tests/browser/test_presets_table.py
// parses the JSON between the BEGIN/END markers and checks it equals the Python table, so keep it
// strict JSON (double quotes, no trailing commas).

export const CONTENT = "content";
export const STYLE = "style";
export const OFF = "off";

// Data-flow order through the UNet: down path, middle, up path. `res` is the latent side for a
// 1024 px image (64 = high resolution, 32 = low resolution), the axis the paper's prior is drawn on.
export const ATTENTION_BLOCKS = [
  { name: "input_blocks.4.1", short: "in4", res: 64 },
  { name: "input_blocks.5.1", short: "in5", res: 64 },
  { name: "input_blocks.7.1", short: "in7", res: 32 },
  { name: "input_blocks.8.1", short: "in8", res: 32 },
  { name: "middle_block.1", short: "mid", res: 32 },
  { name: "output_blocks.0.1", short: "out0", res: 32 },
  { name: "output_blocks.1.1", short: "out1", res: 32 },
  { name: "output_blocks.2.1", short: "out2", res: 32 },
  { name: "output_blocks.3.1", short: "out3", res: 64 },
  { name: "output_blocks.4.1", short: "out4", res: 64 },
  { name: "output_blocks.5.1", short: "out5", res: 64 },
];

const BLOCK_NAMES = ATTENTION_BLOCKS.map((b) => b.name);
// Short names (in4, mid, out3: the diagram's labels) -> block names; duolora.sdxl.parse_custom_preset reads both.
const SHORT_NAMES = Object.fromEntries(ATTENTION_BLOCKS.map((b) => [b.short, b.name]));

// BEGIN PRESETS
export const PRESETS = {
  "paper": {
    "input_blocks.7.1": "content",
    "input_blocks.8.1": "content",
    "middle_block.1": "content",
    "output_blocks.0.1": "content",
    "output_blocks.1.1": "content",
    "output_blocks.2.1": "content",
    "input_blocks.4.1": "style",
    "input_blocks.5.1": "style",
    "output_blocks.3.1": "style",
    "output_blocks.4.1": "style",
    "output_blocks.5.1": "style"
  },
  "code_literal": {
    "input_blocks.7.1": "content",
    "input_blocks.8.1": "content",
    "input_blocks.4.1": "style",
    "input_blocks.5.1": "style",
    "output_blocks.3.1": "style",
    "output_blocks.4.1": "style",
    "output_blocks.5.1": "style"
  },
  "b_lora": {
    "output_blocks.0.1": "content",
    "output_blocks.1.1": "style"
  },
  "none": {}
};
// END PRESETS

export const CUSTOM = "custom";
// "auto": the model family's own preset, which the merge picks from the model (SDXL: paper; Flux.1: none).
export const AUTO = "auto";
// Presets of other model families: the diagram draws SDXL's blocks, so it names them instead.
const OTHER_FAMILY_PRESETS = {
  flux_splitflux: "Flux.1: single blocks 0-9 content, 10-37 style (not drawn: SDXL's blocks shown)",
};

/**
 * Parse the `custom_prior` syntax, e.g. "content: input_blocks.7.1, middle_block.1; style: output_blocks.3.1"
 * or with the diagram's short names, "content: in7, mid; style: out3".
 * Lenient where duolora.sdxl.parse_custom_preset raises: what it cannot read goes to `errors`
 * (shown under the diagram) and the rest is kept, so a half-typed value still draws.
 * @param {string} spec
 * @returns {{roles: Object<string, string>, errors: string[]}} block name -> "content" | "style"
 */
export function parseCustomPrior(spec) {
  const roles = {};
  const errors = [];
  const text = typeof spec === "string" ? spec.trim() : "";
  if (!text) return { roles, errors };
  for (const rawPart of text.split(";")) {
    const part = rawPart.trim();
    if (!part) continue;
    const colon = part.indexOf(":");
    if (colon < 0) {
      errors.push(`'${part}' has no role (write 'content: …' or 'style: …')`);
      continue;
    }
    const role = part.slice(0, colon).trim();
    if (role !== CONTENT && role !== STYLE) {
      errors.push(`role '${role}' must be 'content' or 'style'`);
      continue;
    }
    for (const rawBlock of part.slice(colon + 1).split(",")) {
      const given = rawBlock.trim();
      if (!given) continue;
      const block = SHORT_NAMES[given.toLowerCase()] ?? given;
      if (!BLOCK_NAMES.includes(block)) {
        errors.push(`'${given}' is not an SDXL attention block`);
      } else if (block in roles && roles[block] !== role) {
        errors.push(`'${block}' is both content and style`);
      } else {
        roles[block] = role;
      }
    }
  }
  return { roles, errors };
}

/**
 * Write a block -> role map in the `custom_prior` syntax, blocks in UNet order, roles content first.
 * Returns "" for an empty map (no priors).
 * @param {Object<string, string>} roles
 * @returns {string}
 */
export function formatCustomPrior(roles) {
  const parts = [];
  for (const role of [CONTENT, STYLE]) {
    const blocks = BLOCK_NAMES.filter((b) => roles?.[b] === role);
    if (blocks.length) parts.push(`${role}: ${blocks.join(", ")}`);
  }
  return parts.join("; ");
}

/** The role a click gives a block: content → style → off → content. */
export function nextRole(role) {
  if (role === CONTENT) return STYLE;
  if (role === STYLE) return OFF;
  return CONTENT;
}

/**
 * Block -> role for a preset name, as the node will use it on SDXL. `custom` reads `customSpec`; `note` says what
 * the diagram cannot show (auto's choice on other families, another family's preset).
 * @returns {{roles: Object<string, string>, errors: string[], note?: string}}
 */
export function presetRoles(preset, customSpec) {
  if (preset === CUSTOM) return parseCustomPrior(customSpec);
  if (preset === AUTO) {
    return { roles: { ...PRESETS.paper }, errors: [], note: "auto: paper on SDXL (shown), none on Flux.1" };
  }
  if (Object.prototype.hasOwnProperty.call(OTHER_FAMILY_PRESETS, preset)) {
    return { roles: {}, errors: [], note: OTHER_FAMILY_PRESETS[preset] };
  }
  if (Object.prototype.hasOwnProperty.call(PRESETS, preset)) {
    return { roles: { ...PRESETS[preset] }, errors: [] };
  }
  return { roles: {}, errors: [`unknown preset '${preset}'`] };
}
