"""Engine tests of duolora.report: kept ranks, block / prior-group summaries, the PNG figure, the text.

LoRAs are synthetic (engine_toys.py); masks are set by hand, so every count below is known.
"""

from __future__ import annotations

import io

import torch
from engine_toys import single_thread, toy_setup  # noqa: F401 - autouse fixture
from PIL import Image

from duolora.config import MergeConfig
from duolora.mergers import build_merger
from duolora.report import build_report, short_block
from duolora.sdxl import preset_roles

CONTENT_BLOCKS = ("middle_block.1", "output_blocks.1.1")


def hand_masked_merger():
    """ZipRank over the toy LoRAs (r_c = 8, r_s = 6): in content-prior blocks the style mask keeps 2
    components and the content mask all 8; in style-prior blocks content keeps 3 and style all 6."""
    _, content, style = toy_setup(rank_c=8, rank_s=6)
    merger = build_merger("ziprank", content, style, MergeConfig())
    with torch.no_grad():
        for layer in merger.learned_layers():
            if layer.name.startswith(CONTENT_BLOCKS):
                layer.m_s[2:] = 5e-4  # below the 1e-3 threshold
            else:
                layer.m_c[3:] = 0.0
    return merger


def test_kept_ranks_and_summaries() -> None:
    merger = hand_masked_merger()
    report = build_report(merger, roles=preset_roles("paper"))
    learned = [r for r in report.layers if r.learned]
    assert len(learned) == 32 and len(report.layers) == 38  # + 4 ff layers (one pass-through) + 2 convs
    for r in learned:
        assert (r.kept_c, r.kept_s) == ((8, 2) if r.group == "content" else (8 - 5, 6))
    groups = {s.key: s for s in report.by_group()}
    assert set(groups) == {"content", "style"}  # learned layers only: all sit in prior blocks
    assert (groups["content"].layers, groups["content"].kept_c, groups["content"].kept_s) == (16, 128, 32)
    assert (groups["style"].mean_kept_c, groups["style"].mean_kept_s) == (3.0, 6.0)
    blocks = report.by_block()
    assert [b.key for b in blocks] == ["input_blocks.4.1", "middle_block.1", "output_blocks.1.1", "output_blocks.3.1"]
    assert [(b.mean_kept_c, b.mean_kept_s) for b in blocks] == [(3.0, 6.0), (8.0, 2.0), (8.0, 2.0), (3.0, 6.0)]
    everything = {s.key: s for s in report.by_block(learned_only=False)}
    assert everything["input_blocks.6.0"].kept_c == 8 and everything["output_blocks.3.1"].layers == 9
    # The report counts exactly what the export keeps.
    exported = merger.export()
    assert all(exported.layers[r.name].rank == r.kept_c + r.kept_s for r in report.layers)
    assert [short_block(b.key) for b in blocks] == ["in4", "mid", "out1", "out3"]


def test_text_summary_states_the_numbers() -> None:
    report = build_report(hand_masked_merger(), history={"total": [1.0, 0.5, 0.25], "content": [0.3, 0.2, 0.1]})
    text = report.text()
    assert "method ziprank, 448 trainable mask values, prune threshold 0.001" in text
    assert "32 learned layers: content kept 176/256 components, style kept 128/192" in text
    assert "  content    16 layers     8.00 /    2.00" in text
    assert "loss after 3 steps: total 0.25, content 0.1" in text


def test_figure_is_a_png_with_bars_and_curves() -> None:
    merger = hand_masked_merger()
    plain = build_report(merger).figure_png()
    curves = build_report(merger, history={"total": [1.0, 0.5, 0.2, 0.1], "prior": [2.0, 1.9, 1.8, 1.7]}).figure_png()
    assert plain[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(curves)).convert("RGB")
    assert img.size == (1200, 860)
    pixels = img.load()

    def count(colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> int:
        return sum(pixels[x, y] == colour for x in range(box[0], box[2]) for y in range(box[1], box[3], 2))

    blue, orange = (52, 101, 164), (214, 110, 38)
    assert count(blue, (0, 50, 600, 455)) > 500 and count(orange, (0, 50, 600, 455)) > 500  # content histogram
    assert count(blue, (0, 455, 600, 860)) > 500  # per-block bars
    assert count(blue, (600, 455, 1200, 860)) > 100  # the first loss curve
    plain_pixels = Image.open(io.BytesIO(plain)).convert("RGB").load()
    assert sum(plain_pixels[x, y] == blue for x in range(600, 1200) for y in range(455, 860, 2)) == 0


def test_mask_magnitude_and_kept_share_per_block_and_role() -> None:
    merger = hand_masked_merger()
    with torch.no_grad():
        for layer in merger.learned_layers():  # halve every surviving style entry in content blocks
            if layer.name.startswith(CONTENT_BLOCKS):
                layer.m_s[:2] = 0.5
    report = build_report(merger, roles=preset_roles("paper"))
    groups = {s.key: s for s in report.by_group()}
    # Content blocks: m_c all 1 (|m| 1, share 1); m_s = (0.5, 0.5, 5e-4 ×4).
    assert groups["content"].mask_c == 1.0 and abs(groups["content"].share_c - 1.0) < 1e-6
    assert abs(groups["content"].mask_s - (1.0 + 4 * 5e-4) / 6) < 1e-6
    # Style blocks: m_c keeps its first 3 of 8 singular directions (the largest), so its share of the nuclear
    # norm is above 3/8; m_s is whole.
    assert abs(groups["style"].mask_c - 3 / 8) < 1e-6 and groups["style"].share_c > 3 / 8
    assert abs(groups["style"].share_s - 1.0) < 1e-6
    # In every prior block the role's own LoRA keeps the larger share: the report shows the role ordering.
    for s in report.by_block():
        own, other = (s.share_c, s.share_s) if s.key in CONTENT_BLOCKS else (s.share_s, s.share_c)
        assert own > other
    text = report.text()
    assert "per prior group (mean |mask| content / style; kept nuclear-norm share content / style):" in text
    assert f"  content    16 layers  |m|  1.00 /  0.17   share  1.00 / {groups['content'].share_s:5.2f}" in text
