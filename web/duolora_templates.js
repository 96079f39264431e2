// The pack's templates in ComfyUI's template browser, simplest first. The browser shows a custom-node template
// by its file name and lists a pack's templates in the order the server found the files (directory order), so
// the files are numbered ("1. Merge two LoRAs in seconds.json", ...) and duolora.js passes the server's
// /workflow_templates answer through orderTemplates before the browser reads it.

/** The pack's folder under custom_nodes/: the server serves this file as /extensions/<folder>/…. */
export function packFolder(url = import.meta.url) {
  const parts = new URL(url, "http://localhost/").pathname.split("/").filter(Boolean);
  const at = parts.lastIndexOf("extensions");
  return at >= 0 && at + 1 < parts.length ? decodeURIComponent(parts[at + 1]) : null;
}

function number(name) {
  const match = /^(\d+)\./.exec(String(name));
  return match ? Number(match[1]) : Number.POSITIVE_INFINITY;
}

/**
 * Sort, in place, the template names listed for `folder` in {pack folder: [names]}: numbered names by their
 * number, then the rest in the order they came.
 * @returns {boolean} whether the folder had a list
 */
export function orderTemplates(templates, folder = packFolder()) {
  const names = templates?.[folder];
  if (!Array.isArray(names)) return false;
  const sorted = names.map((name, i) => [number(name), i, name]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  names.splice(0, names.length, ...sorted.map((entry) => entry[2]));
  return true;
}
