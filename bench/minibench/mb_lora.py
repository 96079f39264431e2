"""Train the MiniBench content and style LoRAs (our own small LoRA trainer) and save them as kohya files.

One content LoRA per held-out shape (``star``, ``heart``, ``moon``): that glyph in one known style, 5 fixed
images, caption "a <shape> in solid style". One style LoRA per held-out texture (``diagonal``, ``zigzag``,
``grid``): the texture on known shapes, 2 fixed images, captions "a circle in <texture> style" / "a square in
<texture> style". All adapt the UNet's attention projections only (the layers ZipRank merges), rank 8,
alpha = rank; the base and text encoder stay frozen. A LoRA can also be trained from a folder of images
(bring your own pair: ``LoRASpec.from_folder``).

    OMP_NUM_THREADS=1 python bench/minibench/mb_lora.py --steps 800
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mb_common
import torch
import torch.nn.functional as F
from miniworld import model as mb_model

# The specs and their images moved to devtools/miniworld/loras.py (the demo uses them too).
from miniworld.loras import ALL_SPECS, JOINT_SPECS, LoRASpec, reference_images


class LoRAHooks:
    """Rank-r adapters on named Linear modules via forward hooks: y = W x + B (A x) (alpha = rank, scale 1)."""

    def __init__(self, unet: torch.nn.Module, names: list[str], rank: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        modules = dict(unet.named_modules())
        self.A: dict[str, torch.nn.Parameter] = {}
        self.B: dict[str, torch.nn.Parameter] = {}
        self.handles = []
        for n in names:
            m = modules[n]
            # A ~ N(0, 1/in), B = 0: the adapter starts as the identity, as in the LoRA paper.
            self.A[n] = torch.nn.Parameter(torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5)
            self.B[n] = torch.nn.Parameter(torch.zeros(m.out_features, rank))
            self.handles.append(m.register_forward_hook(self._hook(n)))

    def _hook(self, n: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + F.linear(F.linear(inputs[0], self.A[n]), self.B[n])
        return hook

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.A.values(), *self.B.values()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_lora(model, text: mb_model.MiniTextEncoder, spec: LoRASpec, steps: int, rank: int = 8,
               lr: float = 1e-3, batch: int = 8, seed: int = 0, log=print) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train one LoRA; returns {layer name: (up (out, r), down (r, in))}."""
    from duolora import sdxl

    unet = model.diffusion_model
    for p in unet.parameters():
        p.requires_grad_(False)
    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(model.model_config.unet_config))
    names = list(layout.attention_layers())
    hooks = LoRAHooks(unet, names, rank, seed)
    x_ref, caps = reference_images(spec)
    with torch.no_grad():
        ctx_all, pooled_all = text.encode(caps)
    opt = torch.optim.Adam(hooks.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 99)
    try:
        for step in range(steps):
            idx = torch.randint(len(caps), (batch,), generator=g)
            x0 = x_ref[idx]
            t = torch.randint(0, 1000, (batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            xt, target = mb_common.noisy_and_target(model, x0, t, eps)
            pred = unet(xt, timesteps=t.float(), context=ctx_all[idx], y=mb_common.adm(model, pooled_all[idx]))
            loss = F.mse_loss(pred, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0:
                log(f"{spec.name} step {step + 1} loss {float(loss):.4f}")
    finally:
        hooks.remove()
    return {n: (hooks.B[n].detach().clone(), hooks.A[n].detach().clone()) for n in names}


def save(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], model, path: Path, meta: dict[str, str]) -> Path:
    """Save as an ordinary kohya_ldm LoRA file (alpha = rank) with duolora.formats.save_lora."""
    from duolora import formats, sdxl
    from duolora.lora import LoRA, LowRank

    layout = sdxl.layout_for(sdxl.UNetConfig.from_comfy(model.model_config.unet_config))
    lora = LoRA(layers={n: LowRank(up=b, down=a) for n, (b, a) in layers.items()}, metadata=dict(meta),
                source=str(path), key_style="kohya_ldm", dtype=torch.float32)
    return formats.save_lora(lora, path, key_style="kohya_ldm", dtype=torch.float32, overwrite=True, layout=layout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the MiniBench content and style LoRAs.")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ckpt", type=Path, default=mb_common.CHECKPOINTS / "base_ema.safetensors")
    ap.add_argument("--out", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--force", action="store_true", help="retrain even if the files exist")
    ap.add_argument("--only", nargs="*", default=[], help="names of the LoRAs to train (default: every held-out one)")
    ap.add_argument("--joint", action="store_true",
                    help="the ceiling rows' LoRAs instead (one per held-out pair, trained on renders of the target; "
                         "rank 2 × --rank, the rank a merge of a content and a style LoRA has)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    specs, rank = (JOINT_SPECS, 2 * args.rank) if args.joint else (ALL_SPECS, args.rank)
    return train_missing([s for s in specs if not args.only or s.name in args.only], args.ckpt, args.out,
                         args.steps, rank, args.lr, args.force)


def train_missing(specs: list[LoRASpec], ckpt: Path, out: Path, steps: int, rank: int = 8, lr: float = 1e-3,
                  force: bool = False) -> int:
    """Train every LoRA of ``specs`` whose file is missing in ``out`` (all of them with ``force``)."""
    if not force and all((out / f"{spec.name}.safetensors").exists() for spec in specs):
        return 0
    mb_common.boot()
    model, text = mb_model.load_checkpoint(str(ckpt))
    report_path = out / "loras.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for spec in specs:
        path = out / f"{spec.name}.safetensors"
        if path.exists() and not force:
            continue
        t0 = time.time()
        layers = train_lora(model, text, spec, steps, rank, lr)
        wall = time.time() - t0
        save(layers, model, path, {"minibench_images": spec.images or spec.folder, "minibench_seed": str(spec.seed),
                                   "minibench_steps": str(steps), "minibench_rank": str(rank)})
        report[spec.name] = {"steps": steps, "rank": rank, "wall_time_s": round(wall, 1)}
        print(json.dumps({spec.name: report[spec.name]}), flush=True)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
