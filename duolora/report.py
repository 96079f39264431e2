"""What a merge kept: per layer the kept rank after pruning, the mean mask magnitude and the kept share of
each LoRA's nuclear norm; summaries per block and per prior group; a figure.

Kept rank alone says little when masks are rarely pruned (a mask at 0.1 keeps its component but almost none
of its effect), so every summary also reports mean |m| and the kept nuclear-norm share ρ = Σσᵢ|mᵢ| / Σσᵢ
(``duolora.priors.kept_share``; 1.0 = the LoRA as trained, the quantity the layer priors constrain).
The figure follows the spirit of the paper's Fig. 4/5 (histograms of the rank each LoRA keeps, split by
layer group): four panels drawn with Pillow only — kept-rank histograms of the content and of the
style LoRA (bars per prior group), the kept nuclear-norm share of both LoRAs per block, and the loss curves.
A multi-concept merge (several content LoRAs) reports every LoRA: the text names them and gives each one's
numbers, the figure has one histogram per LoRA and one bar per LoRA and block.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont

from .lora import TEXT_ENCODER_PREFIXES
from .mergers import Merger
from .priors import CONTENT, STYLE, kept_share, preset_roles, prior_role
from .sdxl import block_of, short_block

GROUPS: tuple[str, ...] = (CONTENT, STYLE, "none")
_GROUP_COLOURS = {CONTENT: (52, 101, 164), STYLE: (214, 110, 38), "none": (150, 150, 150)}
_LORA_COLOURS = {"content": (52, 101, 164), "style": (214, 110, 38)}
# Further content LoRAs of a multi-concept merge, in order.
_MORE_CONTENT_COLOURS = [(60, 150, 60), (130, 90, 170), (190, 50, 50), (120, 80, 60), (40, 160, 170)]


@dataclass
class LoRAKept:
    """A further content LoRA's numbers in one layer or summary: ranks as loaded and kept (summed over the
    layers of a summary), mean kept rank, mean |m| and kept nuclear-norm share."""

    rank: int
    kept: int
    mask: float = 0.0
    share: float = 0.0
    mean_kept: float = 0.0
_CURVE_COLOURS = [(52, 101, 164), (214, 110, 38), (60, 150, 60), (190, 50, 50), (130, 90, 170),
                  (120, 80, 60), (40, 40, 40)]


@dataclass
class LayerRank:
    """Ranks of one layer: as loaded (rank_c, rank_s; 0 when the file lacks the layer) and kept."""

    name: str
    block: str
    group: str
    learned: bool
    rank_c: int
    rank_s: int
    kept_c: int
    kept_s: int
    # Mean |m| and kept nuclear-norm share of each LoRA (0.0 when the file lacks the layer).
    mask_c: float = 0.0
    mask_s: float = 0.0
    share_c: float = 0.0
    share_s: float = 0.0
    # Content LoRAs 2, 3, … of a multi-concept merge (the fields above: the first content LoRA and the style).
    more: tuple[LoRAKept, ...] = ()

    @property
    def kept(self) -> int:
        """Components the export keeps in this layer, over every LoRA."""
        return self.kept_c + self.kept_s + sum(m.kept for m in self.more)

    @property
    def rank(self) -> int:
        """Components of the layer before pruning, over every LoRA."""
        return self.rank_c + self.rank_s + sum(m.rank for m in self.more)


@dataclass
class RankSummary:
    """Totals over a set of layers (a block or a prior group); mask and share values are means over the
    layers that have that LoRA."""

    key: str
    layers: int
    rank_c: int
    rank_s: int
    kept_c: int
    kept_s: int
    mask_c: float = 0.0
    mask_s: float = 0.0
    share_c: float = 0.0
    share_s: float = 0.0
    more: tuple[LoRAKept, ...] = ()

    @property
    def mean_kept_c(self) -> float:
        return self.kept_c / self.layers if self.layers else 0.0

    @property
    def mean_kept_s(self) -> float:
        return self.kept_s / self.layers if self.layers else 0.0


def _block(name: str) -> str:
    if name.startswith(TEXT_ENCODER_PREFIXES):
        return name.split(".", 1)[0]
    return block_of(name)


def _label(block: str) -> str:
    """A block's label under its bars: SDXL's short names (in4, mid, out3), Flux.1's d0 … d18 and s0 … s37."""
    head, _, index = block.partition(".")
    if head in ("double_blocks", "single_blocks") and index.isdigit():
        return head[0] + index
    return short_block(block)


def _block_order(block: str) -> tuple[int, int, str]:
    parts = block.split(".")
    # a UNet's path (SDXL), then a transformer's (Flux.1: double-stream before single-stream blocks), then the rest
    rank = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2, "double_blocks": 3,
            "single_blocks": 4}.get(parts[0], 5)
    num = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() and rank != 1 else 0
    return rank, num, block


@dataclass
class MergeReport:
    """Per-layer kept ranks of a merge plus its loss history."""

    method: str
    prune_threshold: float
    trainable: int
    layers: list[LayerRank]
    history: dict[str, list[float]] = field(default_factory=dict)
    # File names of the content LoRAs (several: a multi-concept merge) and of the style LoRA.
    content_names: list[str] = field(default_factory=list)
    style_name: str = ""
    # The model family and the prior preset the merge used, as the report's first line names them (e.g. "Flux.1,
    # prior preset none (auto)"); empty: not said.
    model: str = ""

    @property
    def n_content(self) -> int:
        return 1 + max((len(r.more) for r in self.layers), default=0)

    def labels(self) -> list[str]:
        """Every LoRA as the text and the figure name it: content (content 1, content 2, … when several), style."""
        if self.n_content == 1:
            return ["content", "style"]
        return [f"content {i + 1}" for i in range(self.n_content)] + ["style"]

    def _summarise(self, key_of, keys: list[str], learned_only: bool) -> list[RankSummary]:
        out = []
        for key in keys:
            rows = [r for r in self.layers if key_of(r) == key and (r.learned or not learned_only)]
            if rows:
                with_c = [r for r in rows if r.rank_c] or [None]
                with_s = [r for r in rows if r.rank_s] or [None]

                def avg(rs: list, attr: str) -> float:
                    return sum(getattr(r, attr) for r in rs) / len(rs) if rs[0] is not None else 0.0

                more = []
                for i in range(self.n_content - 1):
                    parts = [r.more[i] for r in rows if i < len(r.more)]
                    having = [p for p in parts if p.rank] or [None]
                    kept = sum(p.kept for p in parts)
                    more.append(LoRAKept(sum(p.rank for p in parts), kept, avg(having, "mask"), avg(having, "share"),
                                         kept / len(rows)))
                out.append(RankSummary(key, len(rows), sum(r.rank_c for r in rows), sum(r.rank_s for r in rows),
                                       sum(r.kept_c for r in rows), sum(r.kept_s for r in rows),
                                       avg(with_c, "mask_c"), avg(with_s, "mask_s"),
                                       avg(with_c, "share_c"), avg(with_s, "share_s"), tuple(more)))
        return out

    @property
    def has_learned(self) -> bool:
        return any(r.learned for r in self.layers)

    def by_block(self, learned_only: bool | None = None) -> list[RankSummary]:
        """Summaries per block in UNet order (default: learned layers only, if the merger learned any)."""
        lo = self.has_learned if learned_only is None else learned_only
        blocks = sorted({r.block for r in self.layers}, key=_block_order)
        return self._summarise(lambda r: r.block, blocks, lo)

    def by_group(self, learned_only: bool | None = None) -> list[RankSummary]:
        """Summaries per prior group: "content", "style", "none" (layers without a prior)."""
        lo = self.has_learned if learned_only is None else learned_only
        return self._summarise(lambda r: r.group, list(GROUPS), lo)

    def text(self) -> str:
        """A plain-text summary: totals, per prior group, per block, and the last loss values. Several content
        LoRAs: a line naming every LoRA, then each one's numbers in the order of that line."""
        scope = "learned layers" if self.has_learned else "all layers"
        head = (f"DuoLoRA merge report - {self.model + ' - ' if self.model else ''}method {self.method}, "
                f"{self.trainable:,} trainable mask values, prune threshold {self.prune_threshold:g}")
        lines = [head]
        labels = self.labels()
        if self.n_content > 1:
            names = [*self.content_names, self.style_name]
            lines.append("LoRAs: " + ", ".join(f"{label} {name}" for label, name in zip(labels, names)))
        rows = [r for r in self.layers if r.learned or not self.has_learned]
        kept = [sum(r.kept_c for r in rows), *(sum(r.more[i].kept for r in rows if i < len(r.more))
                                               for i in range(self.n_content - 1)), sum(r.kept_s for r in rows)]
        ranks = [sum(r.rank_c for r in rows), *(sum(r.more[i].rank for r in rows if i < len(r.more))
                                                for i in range(self.n_content - 1)), sum(r.rank_s for r in rows)]
        parts = [f"{label} kept {k}/{r}" for label, k, r in zip(labels, kept, ranks)]
        parts[0] += " components"
        lines.append(f"{len(rows)} {scope}: " + ", ".join(parts))
        names = " / ".join(labels)
        lines.append(f"per prior group (mean kept rank {names}):")

        def cols(s: RankSummary, attr: str, fmt: str) -> str:
            values = [getattr(s, f"{attr}_c"), *(getattr(m, attr) for m in s.more), getattr(s, f"{attr}_s")]
            return " / ".join(format(v, fmt) for v in values)

        def mean_kept(s: RankSummary) -> str:
            return " / ".join(format(v, "7.2f") for v in (s.mean_kept_c, *(m.mean_kept for m in s.more),
                                                          s.mean_kept_s))

        for s in self.by_group():
            counts = " and ".join(f"{k}/{r}" for k, r in zip(
                (s.kept_c, *(m.kept for m in s.more), s.kept_s), (s.rank_c, *(m.rank for m in s.more), s.rank_s)))
            lines.append(f"  {s.key:<8} {s.layers:>4} layers  {mean_kept(s)}   (kept {counts})")
        lines.append(f"per prior group (mean |mask| {names}; kept nuclear-norm share {names}):")
        for s in self.by_group():
            lines.append(f"  {s.key:<8} {s.layers:>4} layers  |m| {cols(s, 'mask', '5.2f')}"
                         f"   share {cols(s, 'share', '5.2f')}")
        lines.append(f"per block (mean kept rank {names}; mean |mask|; kept nuclear-norm share):")
        for s in self.by_block():
            lines.append(f"  {s.key:<20} {s.layers:>4} layers  {mean_kept(s)}"
                         f"   |m| {cols(s, 'mask', '5.2f')}   share {cols(s, 'share', '5.2f')}")
        if self.history:
            steps = max(len(v) for v in self.history.values())
            last = ", ".join(f"{k} {v[-1]:.4g}" for k, v in self.history.items() if v)
            lines.append(f"loss after {steps} steps: {last}")
        return "\n".join(lines)

    def figure_png(self, width: int = 1200, height: int = 860) -> bytes:
        """The report figure as PNG bytes (RGB, ``width``×``height``)."""
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        font = _font(14)
        small = _font(11)
        d.text((20, 10), f"DuoLoRA merge - {self.method}: kept rank after pruning (|m| < {self.prune_threshold:g})",
               fill="black", font=_font(18))
        top, mid = 50, 50 + (height - 50) // 2
        half = width // 2
        rows = [r for r in self.layers if r.learned or not self.has_learned]
        max_rank = max([r.rank_c for r in rows] + [r.rank_s for r in rows]
                       + [m.rank for r in rows for m in r.more] + [1])
        kept_of = [lambda r: r.kept_c, *(lambda r, i=i: r.more[i].kept if i < len(r.more) else 0
                                         for i in range(self.n_content - 1)), lambda r: r.kept_s]
        rank_of = [lambda r: r.rank_c, *(lambda r, i=i: r.more[i].rank if i < len(r.more) else 0
                                         for i in range(self.n_content - 1)), lambda r: r.rank_s]
        panel = width // len(kept_of)
        for i, (label, kept, rank) in enumerate(zip(self.labels(), kept_of, rank_of)):
            box = (i * panel + 60, top + 30, (i + 1) * panel - 20, mid - 50)
            title = label[0].upper() + label[1:].replace(" ", " LoRA ", 1) if " " in label else f"{label.title()} LoRA"
            # Several content LoRAs: each histogram counts the layers that LoRA patches.
            own = rows if self.n_content == 1 else [r for r in rows if rank(r)]
            _histogram(d, box, own, kept, max_rank, f"{title}: layers per kept rank", font, small)
        _block_bars(d, (60, mid + 30, half - 20, height - 60), self.by_block(), self.labels(), font, small)
        _curves(d, (half + 60, mid + 30, width - 20, height - 60), self.history, font, small)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def build_report(merger: Merger, history: dict[str, list[float]] | None = None,
                 roles: dict[str, str] | None = None, prune_threshold: float | None = None,
                 model: str = "") -> MergeReport:
    """Kept ranks of every layer of ``merger`` (as its export would keep them) and the loss history.

    ``roles``: block -> "content"/"style" (default: the "paper" preset) to group layers by prior; ``model``: the
    model family and prior preset, for the report's first line.
    """
    roles = preset_roles("paper") if roles is None else roles
    threshold = merger.prune_threshold if prune_threshold is None else float(prune_threshold)
    kept = merger.kept_ranks(threshold)
    layers = []
    with torch.no_grad():
        for name, layer in merger.items():
            role = None if name.startswith(TEXT_ENCODER_PREFIXES) else prior_role(name, roles)
            values: dict[str, dict[str, float]] = {}
            for which in layer.tags:
                if layer.factors(which) is not None:
                    values[which] = {"mask": float(layer.mask(which).abs().mean()),
                                     "share": float(kept_share(layer, which))}
            counts = dict(zip(layer.tags, kept[name]))
            more = tuple(LoRAKept(layer.rank(t), counts[t], **values.get(t, {})) for t in merger.content_tags[1:])
            first = merger.content_tags[0]
            layers.append(LayerRank(name, _block(name), role or "none", layer.learned,
                                    layer.rank(first), layer.rank("s"), counts[first], counts["s"],
                                    values.get(first, {}).get("mask", 0.0), values.get("s", {}).get("mask", 0.0),
                                    values.get(first, {}).get("share", 0.0), values.get("s", {}).get("share", 0.0),
                                    more))
    return MergeReport(merger.method, threshold, merger.trainable_parameters(), layers,
                       {k: list(v) for k, v in (history or {}).items()}, list(merger.content_names), merger.style_name,
                       model)


# -- drawing (Pillow only) --------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _axes(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, font: ImageFont.ImageFont) -> None:
    x0, y0, x1, y1 = box
    d.text((x0, y0 - 24), title, fill="black", font=font)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=1)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def _histogram(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rows: list[LayerRank], kept,
               max_rank: int, title: str, font: ImageFont.ImageFont, small: ImageFont.ImageFont) -> None:
    """Bars: number of layers per kept-rank bin, one bar per prior group side by side in each bin."""
    _axes(d, box, title, font)
    x0, y0, x1, y1 = box
    n_bins = min(max_rank + 1, 16)
    width = (max_rank + 1) / n_bins
    counts = {g: [0] * n_bins for g in GROUPS}
    for r in rows:
        counts[r.group][min(int(kept(r) / width), n_bins - 1)] += 1
    groups = [g for g in GROUPS if any(counts[g])]
    top = _nice_max(max([max(c) for c in counts.values()] + [1]))
    bin_w = (x1 - x0) / n_bins
    bar_w = max(bin_w * 0.8 / max(len(groups), 1), 1)
    for b in range(n_bins):
        for j, g in enumerate(groups):
            c = counts[g][b]
            if c:
                left = x0 + b * bin_w + bin_w * 0.1 + j * bar_w
                d.rectangle([left, y1 - (y1 - y0) * c / top, left + bar_w - 1, y1], fill=_GROUP_COLOURS[g])
        if n_bins <= 16:
            lo = math.ceil(b * width)
            d.text((x0 + b * bin_w + 2, y1 + 4), str(lo), fill="black", font=small)
    d.text((x0 - 40, y0 - 6), f"{top:g}", fill="black", font=small)
    d.text((x1 - 110, y1 + 18), "kept rank (bin start)", fill="black", font=small)
    for j, g in enumerate(groups):
        d.rectangle([x1 - 150, y0 + 4 + 16 * j, x1 - 140, y0 + 14 + 16 * j], fill=_GROUP_COLOURS[g])
        d.text((x1 - 135, y0 + 2 + 16 * j), f"{g} prior" if g != "none" else "no prior", fill="black", font=small)


def _block_bars(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], blocks: list, labels: list[str],
                font: ImageFont.ImageFont, small: ImageFont.ImageFont) -> None:
    """Kept nuclear-norm share per block: one bar per LoRA side by side, a line at 1 (as trained)."""
    _axes(d, box, f"Kept share of each LoRA's nuclear norm per block ({' | '.join(labels)})", font)
    x0, y0, x1, y1 = box
    if not blocks:
        return
    colours = [_LORA_COLOURS["content"], *_MORE_CONTENT_COLOURS[:len(labels) - 2], _LORA_COLOURS["style"]]
    top = _nice_max(max([max(s.share_c, s.share_s, *(m.share for m in s.more)) for s in blocks] + [1]))
    one = y1 - (y1 - y0) / top
    d.line([(x0, one), (x1, one)], fill=(170, 170, 170), width=1)
    if top != 1:
        d.text((x0 - 22, one - 6), "1", fill="black", font=small)
    slot = (x1 - x0) / len(blocks)
    bar = max(slot * (0.38 if len(labels) == 2 else 0.76 / len(labels)), 1)
    for i, s in enumerate(blocks):
        left = x0 + i * slot + slot * 0.1
        for j, (value, colour) in enumerate(zip((s.share_c, *(m.share for m in s.more), s.share_s), colours)):
            if value > 0:
                d.rectangle([left + j * bar, y1 - (y1 - y0) * value / top, left + (j + 1) * bar - 1, y1], fill=colour)
        d.text((left, y1 + 4), _label(s.key), fill="black", font=small)
    d.text((x0 - 40, y0 - 6), f"{top:g}", fill="black", font=small)
    for j, (label, colour) in enumerate(zip(labels, colours)):
        d.rectangle([x1 - 150, y0 + 4 + 16 * j, x1 - 140, y0 + 14 + 16 * j], fill=colour)
        d.text((x1 - 135, y0 + 2 + 16 * j), label.replace(" ", " LoRA ", 1) if " " in label else f"{label} LoRA",
               fill="black", font=small)


def _curves(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], history: dict[str, list[float]],
            font: ImageFont.ImageFont, small: ImageFont.ImageFont) -> None:
    """log10 of every loss term per step, one polyline each."""
    _axes(d, box, "Loss terms per step (log10)", font)
    x0, y0, x1, y1 = box
    series = {k: [math.log10(v) for v in vals if v > 0] for k, vals in history.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        d.text((x0 + 10, y0 + 10), "no optimisation history", fill="gray", font=small)
        return
    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    steps = max(len(v) for v in series.values())
    for i, (k, vals) in enumerate(series.items()):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        pts = [(x0 + (x1 - x0) * j / max(steps - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
               for j, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        d.text((x1 - 120, y0 + 2 + 14 * i), k, fill=colour, font=small)
    d.text((x0 - 44, y0 - 6), f"{hi:.1f}", fill="black", font=small)
    d.text((x0 - 44, y1 - 10), f"{lo:.1f}", fill="black", font=small)
    d.text((x1 - 60, y1 + 4), f"{steps} steps", fill="black", font=small)
