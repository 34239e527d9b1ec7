"""Every trainable stage at paper size: training-step throughput and peak memory in fp32, bf16-mixed and
16-mixed, and AsyCMST's cross-attention ratio (asymmetric vs global core) per SDPA kernel (issue 14, item 6).

Meant for one CUDA device (found by itself; ``--device`` overrides).  Each stage is built from its paper-size
config in ``conf/`` (model, optimiser, the data config's input size and per-device batch; ``pretrained: false``,
no checkpoint files: random init, nothing downloaded) and trained on one synthetic batch of that size, the
same batch every step (the input pipeline is not what is measured here: ``bench_reads.py``,
``bench_real_size.py`` do that):

- a step is what Lightning's automatic optimisation does: the stage's own ``training_step`` (loss included)
  under ``torch.autocast`` for the mixed precisions, backward (through ``torch.amp.GradScaler`` for
  ``16-mixed``), optimiser step, ``zero_grad(set_to_none=True)``; ``--warmup`` steps, then ``--steps`` timed
  ones (each synchronised), median per step;
- throughput = samples per second (the unit a stage's batch counts: stacks, frames, nodules, clips, images);
- peak memory = ``torch.cuda.max_memory_allocated`` over the timed steps, weights and optimiser state
  included (on a CPU there is no per-stage figure: ``null``);
- a stage that runs out of memory is recorded as ``"oom"`` (an error as ``"error: ..."``) and the run goes on.

Stages (the config): ``vit`` (``conf/vit.yaml``: frozen ViT-B/16, backbone every step, i.e. the first epoch
with the feature cache or every epoch without it), ``vit_cached`` (the same stage on cached features: epochs
2-100), ``seg`` (MSU-Net), ``maskcnn``, ``head`` (attention head; ``--stacks`` stacks per nodule, 30 by
default: ~90 frames per real Stanford clip / 3), ``cinetrans``, ``asycmst`` (the paper's global batch 32 on one
device, every frame's BUS mask annotated: the decoder's largest cost), ``transunet``, ``roi_resnet18``,
``csasn``.

Attention: T 16, N 49 (7 x 7 tokens), D 384, M 6 heads, the per-device batch of ``conf/asycmst.yaml``; the two
cross-attentions alone (``core``: Q, K, V given) with the library's :func:`attend` (what the model runs),
forward + backward, in float32, bfloat16 and float16, under each SDPA kernel that accepts the inputs
(``default`` = torch's own choice; ``flash``, ``efficient``, ``cudnn``, ``math`` forced through
``torch.nn.attention.sdpa_kernel``; one that refuses them is recorded as ``n/a``), asymmetric and global
interleaved round by round; plus the whole ``CrossModalAttention`` block (projections included) under autocast.

    python benchmarks/bench_paper_size.py                     # on the GPU machine: ~3-5 min on one H200
    python benchmarks/bench_paper_size.py --stages vit asycmst --steps 5
    python benchmarks/bench_paper_size.py --tiny              # CPU smoke run of the same code (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import yaml

from datamodules.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
AMP_DTYPE = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
ATTN_DTYPE = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
KERNELS = ("default", "flash", "efficient", "cudnn", "math")

# stage -> (config, what one sample of its batch is)
STAGES = {
    "vit": ("vit.yaml", "stacks"),
    "vit_cached": ("vit.yaml", "stacks"),
    "seg": ("seg.yaml", "frames"),
    "maskcnn": ("maskcnn.yaml", "stacks"),
    "head": ("head.yaml", "nodules"),
    "cinetrans": ("cinetrans.yaml", "nodules"),
    "asycmst": ("asycmst.yaml", "clips"),
    "transunet": ("transunet.yaml", "images"),
    "roi_resnet18": ("roi_resnet18.yaml", "images"),
    "csasn": ("csasn.yaml", "images"),
}

# Init args that would fetch or read starting weights: off (random init is what the speed depends on anyway).
OFFLINE = {
    "pretrained": False,
    "checkpoint_path": None,
    "cnn_checkpoint_path": None,
    "vit_checkpoint_path": None,
}

# --tiny: the same stages at toy size (model init args, then the data settings), for the CPU test.
TINY_RESNET = {"channels": [8, 8, 8, 8], "stem_width": 8, "out_indices": [3]}
TINY = {
    "vit": ({"backbone": "test_vit", "img_size": 32}, {"img_size": 32}),
    "vit_cached": ({"backbone": "test_vit", "img_size": 32}, {"img_size": 32}),
    "seg": ({"base": 4, "depth": 3}, {"size": 32}),
    "maskcnn": ({"channels": [4, 8]}, {"img_size": 32}),
    "head": ({}, {}),
    "cinetrans": ({}, {}),
    "asycmst": (
        {
            "dim": 16,
            "depth": 1,
            "heads": 2,
            "num_frames": 2,
            "img_size": 32,
            "backbone": "resnet10t",
            "backbone_args": TINY_RESNET,
            "decoder_width": 8,
        },
        {"frames": 2, "size": 32},
    ),  # fmt: skip
    "transunet": (
        {
            "hybrid": {
                "layers": [1, 1, 1],
                "channels": [8, 8, 8],
                "stem_chs": 8,
                "norm_groups": 4,
                "embed_dim": 16,
                "depth": 1,
                "num_heads": 2,
            },
            "img_size": 32,
            "head_channels": 8,
            "decoder_channels": [8, 8, 8, 8],
        },
        {"img_size": 32},
    ),  # fmt: skip
    "roi_resnet18": ({"backbone": "test_resnet"}, {"img_size": 32}),
    "csasn": (
        {
            "cnn_backbone": "test_efficientnet",
            "vit_backbone": "test_vit",
            "img_size": 32,
            "fusion_dim": 8,
            "reduction": 4,
            "spatial_kernel": 3,
            "depth": 1,
            "hidden_dim": 16,
        },
        {"img_size": 32},
    ),  # fmt: skip
}
TINY_BATCH, TINY_STACKS = 2, 3
PAPER_ATTN = {"t": 16, "n": 49, "dim": 384, "heads": 6}
TINY_ATTN = {"t": 4, "n": 4, "dim": 16, "heads": 2}


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_config(stage: str, tiny: bool) -> dict:
    """``{"model": (class, init args), "data": init args, "optimizer": (class, init args), "precision"}``."""
    cfg = yaml.safe_load((ROOT / "conf" / STAGES[stage][0]).read_text())
    model = {**cfg["model"].get("init_args", {}), **OFFLINE}
    data = dict(cfg["data"].get("init_args", {}))
    if tiny:
        model.update(TINY[stage][0])
        data.update(TINY[stage][1])
        data["batch_size"] = TINY_BATCH
        if data.get("global_batch_size"):
            data["global_batch_size"] = TINY_BATCH
    model_cls = _class(cfg["model"]["class_path"])
    takes = inspect.signature(model_cls.__init__).parameters
    model = {k: v for k, v in model.items() if k in takes}
    opt = cfg.get("optimizer") or {"class_path": "torch.optim.AdamW", "init_args": {}}
    return {
        "model": (model_cls, model),
        "data": data,
        "optimizer": (_class(opt["class_path"]), dict(opt.get("init_args") or {})),
        "config_precision": cfg.get("trainer", {}).get("precision"),
    }


def batch_size(data: dict) -> int:
    """Per-device batch on one device: the global batch when the config fixes one, else ``batch_size``."""
    return int(data.get("global_batch_size") or data["batch_size"])


def make_batch(stage: str, model, data: dict, stacks: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One synthetic batch in the stage's schema at the config's sizes (values random, labels both classes)."""
    b = batch_size(data)
    label = torch.arange(b) % 2

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def binary(*shape):
        return (rand(*shape) > 0.5).float()

    if stage in ("vit", "maskcnn"):
        s = data["img_size"]
        image = rand(b, 3, s, s) if stage == "vit" else binary(b, 3, s, s)
        return {"image": image, "label": label, "nodule": torch.arange(b) // 3, "stack": torch.arange(b) % 3}
    if stage == "vit_cached":
        width = model.net.backbone.num_features
        return {"features": torch.randn(b, width, generator=g), "label": label,
                "nodule": torch.arange(b) // 3, "stack": torch.arange(b) % 3}  # fmt: skip
    if stage == "seg":
        s = data["size"]
        return {"image": rand(b, 1, s, s), "mask": binary(b, 1, s, s), "nodule": torch.arange(b),
                "frame": torch.zeros(b, dtype=torch.long)}  # fmt: skip
    if stage in ("head", "cinetrans"):
        dim = model.hparams.dim
        return {"image_emb": torch.randn(b, stacks, dim, generator=g), "seg_emb": torch.randn(b, stacks, dim, generator=g),
                "valid": torch.ones(b, stacks, dtype=torch.bool), "label": label, "nodule": torch.arange(b)}  # fmt: skip
    if stage == "asycmst":
        t, s = data["frames"], data["size"]
        return {"bus": rand(b, t, 3, s, s), "ceus": rand(b, t, 3, s, s), "mask": binary(b, t, 1, s, s),
                "mask_valid": torch.ones(b, t, dtype=torch.bool), "label": label, "index": torch.arange(b)}  # fmt: skip
    s = data["img_size"]
    channels = data.get("channels", 3)
    out = {"image": rand(b, channels, s, s), "label": label, "index": torch.arange(b)}
    if stage == "transunet":
        out["mask"] = binary(b, 1, s, s)
    if stage == "csasn":
        out["subtype"] = torch.arange(b) % len(model.subtypes)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Give the last stage's GPU memory back before the next one (a full ``gc`` pass costs ~0.5 s: GPU only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _autocast(device: torch.device, precision: str):
    dtype = AMP_DTYPE[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_stage(stage: str, precision: str, device: torch.device, args) -> dict:
    """Build the stage, train ``warmup + steps`` steps on one batch; figures of the timed steps."""
    cfg = load_config(stage, args.tiny)
    torch.manual_seed(0)
    model_cls, init = cfg["model"]
    model = model_cls(**init).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls, opt_args = cfg["optimizer"]
    opt = opt_cls(params, **opt_args)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    g = torch.Generator().manual_seed(0)
    stacks = TINY_STACKS if args.tiny else args.stacks
    batch = {k: v.to(device) for k, v in make_batch(stage, model, cfg["data"], stacks, g).items()}
    b = batch_size(cfg["data"])

    def step(i: int) -> None:
        with _autocast(device, precision):
            loss = model.training_step(batch, i)
        if isinstance(loss, dict):
            loss = loss["loss"]
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    out = {
        "status": "ok",
        "batch": b,
        "unit": STAGES[stage][1],
        "step_ms": 1e3 * per_step,
        "samples_per_s": b / per_step,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "config_precision": cfg["config_precision"],
    }
    return out


def run_stage(stage: str, precision: str, device: torch.device, args) -> dict:
    try:
        return measure_stage(stage, precision, device, args)
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as e:  # noqa: BLE001  (one stage failing must not lose the others' figures)
        first = (str(e).splitlines() or [""])[0][:300]
        return {"status": f"error: {type(e).__name__}: {first}"}
    finally:
        _release(device)


# ---------------------------------------------------------------------------------------------- attention
def _kernel_context(kernel: str):
    if kernel == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]  # fmt: skip
    return sdpa_kernel([backend])


def _core_fn(strategy: str, b: int, t: int, n: int, dim: int, heads: int, dtype, device, g):
    """Forward + backward of the two cross-attentions of ``strategy`` alone (Q, K, V given)."""
    from lightning_modules.nets.asycmst_attention import STRATEGY_PATTERNS, attend

    shape = (b, heads, t, n, dim // heads)

    def leaf():
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q_c, k_c, v_c, q_b, k_b, v_b = (leaf() for _ in range(6))
    grads = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2)]
    pattern_c, pattern_b = STRATEGY_PATTERNS[strategy]
    leaves = (q_c, k_c, v_c, q_b, k_b, v_b)

    def fn() -> None:
        for x in leaves:
            x.grad = None
        out_c = attend(q_c, k_b, v_b, pattern_c)
        out_b = attend(q_b, k_c, v_c, pattern_b)
        torch.autograd.backward([out_c, out_b], grads)

    return fn


def _block_fn(strategy: str, b: int, t: int, n: int, dim: int, heads: int, precision: str, device, g):
    """Forward + backward of the whole ``CrossModalAttention`` (projections included) under autocast."""
    from lightning_modules.nets.asycmst_attention import CrossModalAttention

    torch.manual_seed(0)
    block = CrossModalAttention(dim=dim, heads=heads, strategy=strategy).to(device)
    x_c, x_b = (torch.randn(b, t, n, dim, generator=g).to(device).requires_grad_() for _ in range(2))
    grads = [torch.randn(b, t, n, dim, generator=g).to(device) for _ in range(2)]

    def fn() -> None:
        block.zero_grad(set_to_none=True)
        x_c.grad = x_b.grad = None
        with _autocast(device, precision):
            out = block(x_c, x_b)
        torch.autograd.backward(list(out), grads)

    return fn


def interleaved(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each function, run round after round (each round: every function once)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def _pair(make, device, args) -> dict:
    try:
        fns = {s: make(s) for s in ("asymmetric", "global")}
        ms = interleaved(fns, device, args.warmup, args.repeats)
        return {"asymmetric_ms": ms["asymmetric"], "global_ms": ms["global"],
                "global_over_asymmetric": ms["global"] / ms["asymmetric"]}  # fmt: skip
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as e:  # noqa: BLE001  (a kernel that refuses these inputs: recorded, not fatal)
        return {"status": f"n/a: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    finally:
        _release(device)


def measure_attention(device: torch.device, args, precisions) -> dict:
    dims = TINY_ATTN if args.tiny else PAPER_ATTN
    b = TINY_BATCH if args.tiny else batch_size(load_config("asycmst", False)["data"])
    kernels = KERNELS if device.type == "cuda" else ("default", "flash", "math")
    out = {"batch": b, **dims, "core": {}, "block": {}}
    for precision in precisions:
        dtype = ATTN_DTYPE[precision]
        out["core"][precision] = {}
        for kernel in kernels:
            g = torch.Generator().manual_seed(0)

            def make(strategy, dtype=dtype, g=g):
                return _core_fn(
                    strategy, b, dims["t"], dims["n"], dims["dim"], dims["heads"], dtype, device, g
                )

            with _kernel_context(kernel):
                out["core"][precision][kernel] = _pair(make, device, args)
        g = torch.Generator().manual_seed(0)

        def make_block(strategy, precision=precision, g=g):
            return _block_fn(
                strategy, b, dims["t"], dims["n"], dims["dim"], dims["heads"], precision, device, g
            )

        out["block"][precision] = _pair(make_block, device, args)
    return out


# ---------------------------------------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    info = {"platform": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
            "device": str(device), "float32_matmul_precision": torch.get_float32_matmul_precision()}  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        info["threads"] = torch.get_num_threads()
    return info


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda / cuda:1 / cpu (default: cuda when there is one)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--steps", type=int, default=10, help="timed training steps per stage and precision")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN / allocator warm-up)")
    p.add_argument("--repeats", type=int, default=20, help="attention rounds")
    p.add_argument("--stacks", type=int, default=30, help="stacks per nodule in the head's batch")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default=None,
                   help="torch.set_float32_matmul_precision (high = TF32 on Ampere+; default: torch's)")  # fmt: skip
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke run of the same code)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default benchmarks/results/paper_size[_tiny].json)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    out_path = args.out or Path(f"benchmarks/results/paper_size{'_tiny' if args.tiny else ''}.json")
    warnings.filterwarnings(
        "ignore", message=".*self.log.*"
    )  # steps run without a Trainer: nothing to log to
    result = {"benchmark": "paper-size stages (issue 14 item 6)", "tiny": args.tiny, "machine": machine(device),
              "steps": args.steps, "warmup": args.warmup, "stages": {}}  # fmt: skip
    for stage in args.stages:
        result["stages"][stage] = {}
        for precision in args.precisions:
            r = run_stage(stage, precision, device, args)
            result["stages"][stage][precision] = r
            figure = f"{r['samples_per_s']:.1f} {r['unit']}/s" if r["status"] == "ok" else r["status"]
            peak = f", peak {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""
            print(f"{stage} {precision}: {figure}{peak}", flush=True)
            write_json(result, out_path)  # after every figure: a run cut short keeps what it measured
    if not args.no_attention:
        result["attention"] = measure_attention(device, args, args.precisions)
        for precision, kernels in result["attention"]["core"].items():
            line = ", ".join(
                f"{k} {v['global_over_asymmetric']:.1f}x" if "global_over_asymmetric" in v else f"{k} n/a"
                for k, v in kernels.items()
            )
            print(f"attention core global/asymmetric, {precision}: {line}", flush=True)
    write_json(result, out_path)
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
