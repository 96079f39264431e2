"""Benchmarks of the merge modes (``make bench`` / ``python -m bench``); not collected by pytest.

B1 weights-only merge of full-size SDXL LoRAs (time and memory ratios), B2 the paper-mode step on the tiny
SDXL-layout model in the real ComfyUI, B3 fidelity of every merge mode on that model. Every number is a
median over repeated runs, and every ratio is measured in the same run as its two terms.
"""
