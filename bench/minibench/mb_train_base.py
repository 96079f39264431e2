"""Train the MiniBench base model from scratch (seeded, resumable, EMA).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/minibench/mb_train_base.py --steps 3000

Writes ``<out>/base_state.pt`` (full training state, for resuming; not meant for git) every
``--save-every`` steps, and ``<out>/base_ema.safetensors`` (EMA weights: ``unet.*`` + ``text.*``) with a
``MANIFEST.json`` (command, seed, steps, wall time, loss). Re-running the same command resumes.
The batch for step k is generated from seed (seed, k), so a resumed run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mb_common
import torch
from miniworld import model as mb_model
from miniworld import world as mb_world


def make_batch(step: int, seed: int, batch: int, text: mb_model.MiniTextEncoder, p_uncond: float = 0.1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B,3,32,32) and caption ids (B,5) of step ``step``; ~10 % empty captions for CFG."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shapes, textures = mb_world.sample_pairs(batch, g)
    x0 = mb_world.render(shapes, textures, g)
    caps = [mb_world.caption(s, t) for s, t in zip(shapes, textures, strict=True)]
    drop = torch.rand(batch, generator=g) < p_uncond
    caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)]
    ids = torch.tensor([mb_model.tokenize(c) for c in caps], dtype=torch.long)
    return x0, ids, g


def diffusion_loss(unet: torch.nn.Module, model, text: mb_model.MiniTextEncoder, x0: torch.Tensor,
                   ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """MSE of the model's prediction (ε or v, mb_common.noisy_and_target) at a uniform timestep of its own
    ComfyUI schedule."""
    b = x0.shape[0]
    t = torch.randint(0, 1000, (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt, target = mb_common.noisy_and_target(model, x0, t, eps)
    ctx, pooled = text(ids)
    pred = unet(xt, timesteps=t.float(), context=ctx, y=mb_common.adm(model, pooled))
    return torch.nn.functional.mse_loss(pred, target)


def export_ema(ema: dict[str, torch.Tensor], path: Path, prediction: str) -> None:
    """Write EMA weights as safetensors (keys ``unet.*`` and ``text.*``, float32; metadata: the prediction)."""
    import safetensors.torch

    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp),
                                metadata={mb_model.PREDICTION_KEY: prediction})
    tmp.replace(path)


def init_from_ema(path: Path, unet: torch.nn.Module, text: torch.nn.Module, prediction: str
                  ) -> tuple[int, float, list[str]]:
    """Load EMA weights written by :func:`export_ema`; return (step, wall time, history) from its MANIFEST.

    The weights may have been trained for another prediction (ε → v on a zero-terminal-SNR schedule, the way
    v-prediction SDXL checkpoints were fine-tuned from ε ones); the history says so.
    """
    import safetensors.torch

    sd = safetensors.torch.load_file(str(path))
    unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
    manifest = json.loads((path.parent / "MANIFEST.json").read_text())
    history = list(manifest.get("history", []))
    history.append(f"{manifest.get('command', '')} (to step {manifest['steps_done']}, "
                   f"{manifest.get('prediction', 'eps')})")
    was = mb_model.checkpoint_prediction(str(path))
    switch = f", switching the prediction from {was} to {prediction}" if was != prediction else ""
    history.append(f"step {manifest['steps_done']}: continued from these steps' EMA weights (fresh Adam state, "
                   f"100-step re-warm-up){switch} by the command above")
    return int(manifest["steps_done"]), float(manifest["wall_time_s"]), history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=mb_common.CHECKPOINTS)
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop (with a checkpoint) after this many s")
    ap.add_argument("--prediction", choices=tuple(mb_model.PREDICTIONS), default="v_zsnr",
                    help="what the model predicts (miniworld.model.PREDICTIONS; default v on a zero-terminal-SNR "
                         "schedule: with ε on SDXL's schedule the model reads the image's mean colour out of x_T)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="when no base_state.pt exists: continue from these EMA weights (base_ema.safetensors) at "
                         "the step recorded in MANIFEST.json, with a fresh optimiser and a 100-step re-warm-up")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "base_state.pt"

    mb_common.boot()
    torch.manual_seed(args.seed)
    model = mb_model.build_model_base(args.seed, args.prediction)
    unet = model.diffusion_model
    unet.train()
    # Current ComfyUI builds its models frozen (BaseModel sets requires_grad False on the UNet); this trains it.
    unet.requires_grad_(True)
    text = mb_model.MiniTextEncoder()
    with torch.no_grad():
        g0 = torch.Generator().manual_seed(args.seed + 17)
        text.words.weight.copy_(torch.randn(text.words.weight.shape, generator=g0))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    named = {**{f"unet.{k}": p for k, p in unet.named_parameters()},
             **{f"text.{k}": p for k, p in text.named_parameters()}}
    ema: dict[str, torch.Tensor] | None = None
    step, wall, losses = 0, 0.0, []
    warm_start, history = 0, []
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        step, wall, losses = st["step"], st["wall"], st["losses"]
        warm_start, history = st.get("warm_start", 0), st.get("history", [])
        print(f"resumed at step {step} ({wall:.0f} s so far)", flush=True)
    elif args.init_from is not None:
        step, wall, history = init_from_ema(args.init_from, unet, text, args.prediction)
        warm_start = step
        print(f"continuing from the EMA weights of step {step} in {args.init_from}", flush=True)
    if ema is None:  # a fresh start, or the loaded EMA weights as the new EMA's start
        ema = {k: p.detach().clone() for k, p in named.items()}

    def save() -> None:
        torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema,
                    "step": step, "wall": wall, "losses": losses, "args": vars(args),
                    "warm_start": warm_start, "history": history}, str(state_path) + ".tmp")
        Path(str(state_path) + ".tmp").replace(state_path)
        export_ema(ema, args.out / "base_ema.safetensors", args.prediction)
        recent = losses[-50:]
        manifest = {
            "command": "OMP_NUM_THREADS=1 python bench/minibench/mb_train_base.py " + " ".join(
                a for a in (sys.argv[1:] if argv is None else argv)),
            "seed": args.seed, "prediction": args.prediction, "steps_done": step, "steps_target": args.steps, "batch": args.batch,
            "lr": args.lr, "ema_decay": args.ema, "wall_time_s": round(wall, 1),
            "loss_last50_mean": round(sum(recent) / max(len(recent), 1), 5),
            "unet_config": mb_model.MINI_UNET_CONFIG,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_parameters": sum(p.numel() for p in text.parameters()),
        }
        if history:
            manifest["history"] = history
        (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")

    t_start = time.time()
    while step < args.steps:
        t0 = time.time()
        warm = min(1.0, (step - warm_start + 1) / 100)
        # Cosine from this run's first step (0, or the step it continued from) to --steps, down to 10 %.
        progress = (step - warm_start) / max(args.steps - warm_start, 1)
        lr = args.lr * warm * (0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, ids, g = make_batch(step, args.seed, args.batch, text)
        loss = diffusion_loss(unet, model, text, x0, ids, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in named.items():
                ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(float(loss.detach()))
        wall += time.time() - t0
        if step % 20 == 0:
            print(f"step {step} loss {sum(losses[-20:]) / 20:.4f} lr {lr:.2e} {wall:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save()
        if args.time_limit and time.time() - t_start > args.time_limit:
            save()
            print(f"time limit reached at step {step}", flush=True)
            break
    if step >= args.steps and step % args.save_every:
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
