"""Whole-model inference time per sample at paper size (AsyCMST Table 6: D 384, L 6, M 6, T 16, 224 x 224),
AsyCMST against dual-stream ViViT baselines of the same width and depth without cross-attention.

Models (eval mode, ``torch.inference_mode``, autocast in ``--dtype`` unless float32):

- ``asycmst``: the paper's model (asymmetric ACMST in all 6 stages; the FSS scorer runs, the mask decoder does
  not — inference needs no masks);
- ``symmetric`` / ``global``: the same model with Table 5's other strategies;
- ``vivit-resnet``: the same two ResNet-18 frame encoders and STSA stages, no ACMST, no auxiliary heads
  (Table 4's baseline row, i.e. AsyCMST minus its contributions);
- ``vivit-patch16``: a dual-stream ViViT in the original sense: 16 x 16 patch embedding per frame (196 tokens
  per frame instead of 49), the same factorised STSA stages, late fusion by summed GAP -> FC;
- ``official`` (not run by default): the paper's model with ``block: official``, the authors' transformer
  (joint self-attention, post-norm, ReLU/2048); ``authors``: the same with one shared encoder and no auxiliary
  heads, the authors' public model (44.8 M parameters).

Models are timed in interleaved rounds (median and minimum per model), so load from other processes hits all
alike.  ``--fuse-only`` times just the token stages on precomputed frame features (the part where the models
differ), which is far less noisy on a shared CPU.

    python benchmarks/bench_asycmst_inference.py                          # CPU, B = 1, whole model
    python benchmarks/bench_asycmst_inference.py --fuse-only
    python benchmarks/bench_asycmst_inference.py --device cuda --dtype float16 --batch 1 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from datamodules.atomic import write_json
from lightning_modules.nets.asycmst import AsyCMSTNet
from lightning_modules.nets.asycmst_attention import STSABlock


class DualViViT(nn.Module):
    """Two ViViT (factorised self-attention) streams on 16 x 16 patches, summed GAP -> FC (benchmark only)."""

    def __init__(self, *, dim: int, depth: int, heads: int, num_frames: int, img_size: int, patch: int = 16):
        super().__init__()
        n = (img_size // patch) ** 2
        self.embed = nn.ModuleList(nn.Conv2d(3, dim, patch, patch) for _ in range(2))
        self.pos = nn.ParameterList(nn.Parameter(torch.zeros(1, num_frames, n, dim)) for _ in range(2))
        self.blocks = nn.ModuleList(
            nn.ModuleList(STSABlock(dim=dim, heads=heads) for _ in range(depth)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward_frames(self, c: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            rearrange(self.embed[i](rearrange(clip, "b t c h w -> (b t) c h w")), "(b t) d h w -> b t (h w) d",
                      b=clip.shape[0])
            for i, clip in enumerate((c, b))
        )  # fmt: skip

    def forward_fusion(self, f_c: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        pooled = 0
        for i, x in enumerate((f_c, f_b)):
            x = x + self.pos[i]
            for blk in self.blocks[i]:
                x = blk(x)
            pooled = pooled + x.mean(dim=(1, 2))
        return self.norm(pooled)

    def forward(self, c: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.forward_fusion(*self.forward_frames(c, b)))}


def build(name: str, size: dict) -> nn.Module:
    if name == "vivit-patch16":
        return DualViViT(**size)
    if name == "vivit-resnet":
        return AsyCMSTNet(**size, strategy="none", fss=False, ns=False)
    if name == "official":
        return AsyCMSTNet(**size, block="official")
    if name == "authors":
        return AsyCMSTNet(**size, block="official", share_encoders=True, fss=False, ns=False)
    strategy = {"asycmst": "asymmetric"}.get(name, name)
    return AsyCMSTNet(**size, strategy=strategy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_models(models: dict[str, nn.Module], batch: int, size: dict, device: torch.device, dtype: torch.dtype,
                repeats: int, warmup: int, fuse_only: bool = False) -> dict[str, dict]:  # fmt: skip
    """Time every model in interleaved rounds (model A, B, C, A, B, C, ...), so that load from other processes
    on a shared machine hits all models alike; median and minimum per model."""
    t, s = size["num_frames"], size["img_size"]
    c = torch.randn(batch, t, 3, s, s, device=device)
    b = torch.randn(batch, t, 3, s, s, device=device)
    amp = dtype != torch.float32
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
        # fuse_only: the token stages alone (positional encodings, STSA, ACMST, pooling) on precomputed frame
        # features, i.e. the part where the models differ (the frame encoders are identical or a patch conv)
        feats = {name: m.forward_frames(c, b) for name, m in models.items()} if fuse_only else {}
        for i in range(warmup + repeats):
            for name, model in models.items():
                _sync(device)
                t0 = time.perf_counter()
                model.forward_fusion(*feats[name]) if fuse_only else model(c, b)
                _sync(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ms = statistics.median(ts)
        out[name] = {"ms_batch": ms, "ms_per_sample": ms / batch, "ms_min_per_sample": min(ts) / batch}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument(
        "--models", nargs="+", default=["asycmst", "symmetric", "global", "vivit-resnet", "vivit-patch16"]
    )
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--fuse-only", action="store_true", help="time the token stages only, not the frame encoders"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = dict(dim=args.dim, depth=args.depth, heads=args.heads, num_frames=args.frames, img_size=args.size)
    torch.manual_seed(0)
    models = {name: build(name, size).to(device).eval() for name in args.models}
    rows = []
    for batch in args.batch:
        timed = time_models(models, batch, size, device, dtype, args.repeats, args.warmup, args.fuse_only)
        for name, r in timed.items():
            params = sum(p.numel() for p in models[name].parameters())
            rows.append({"model": name, "batch": batch, "params_m": params / 1e6, **r})
            print(f"{name:14s} B={batch:<3d} {r['ms_per_sample']:9.2f} ms/sample (min {r['ms_min_per_sample']:.2f})"
                  f"  {params / 1e6:.1f} M params", flush=True)  # fmt: skip
    ratios = []
    for batch in args.batch:
        got = {r["model"]: r for r in rows if r["batch"] == batch}
        for base in ("vivit-resnet", "vivit-patch16"):
            if base in got:
                ratios += [{"batch": batch, "model": m, "baseline": base,
                            "ratio": v["ms_per_sample"] / got[base]["ms_per_sample"],
                            "ratio_of_min": v["ms_min_per_sample"] / got[base]["ms_min_per_sample"]}
                           for m, v in got.items() if m != base]  # fmt: skip
    result = {
        "benchmark": "asycmst_inference",
        "part": "fuse_only" if args.fuse_only else "whole_model",
        "size": size,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rows": rows,
        "ratios": ratios,
    }
    for r in ratios:
        print(
            f"B={r['batch']} {r['model']:14s} / {r['baseline']:14s} = {r['ratio']:.2f}x "
            f"(of minima {r['ratio_of_min']:.2f}x)"
        )
    suffix = "_fuse" if args.fuse_only else ""
    out = args.out or Path(__file__).parent / "results" / f"asycmst_inference{suffix}_{device.type}.json"
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
