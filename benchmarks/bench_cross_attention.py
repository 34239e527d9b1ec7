"""Cross-modal attention cost at paper scale (AsyCMST Table 5): asymmetric vs symmetric vs global (and the
spatial-/temporal-only strategies), forward + backward time and peak memory, against a naive per-position loop.

Two things are timed per strategy and batch size:

- ``module``: the whole :class:`CrossModalAttention` (Q/K/V projections of both streams, the two attentions,
  output projections), what one ACMST stage costs;
- ``core``: the two attention calls alone (Q, K, V given), i.e. the part whose size Table 5's "interaction
  number" counts; the projections are identical for every strategy.

FLOPs are counted analytically (one multiply-add = 2 FLOPs; backward = 2 x forward) and turned into a time
bound with the device's measured matmul throughput (a large square matmul in the same dtype), so
``time / bound`` says how far a variant is from being compute-bound.

Timing: all variants of one batch size run interleaved, round after round (``--repeats`` rounds), and each
figure is the median over rounds of the *thread CPU time* (``time.thread_time``; one torch thread) beside the
wall time: on a machine shared with other jobs, CPU time is not inflated by waiting for a core, wall time is.
The backward pass takes a dense random upstream gradient (the ``.sum()`` of the first version handed SDPA an
expanded gradient, which no network produces) and gradients are set to ``None`` before every step, as an
optimiser's ``zero_grad`` does.  ``asymmetric-bmm`` is the asymmetric strategy with :func:`attend_bmm`, a batched-matmul
candidate for the spatial / temporal patterns that was measured against the library's SDPA path and not adopted.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU, the running peak of the allocation balance that
``torch.profiler`` (profile_memory=True) records per op, in time order; both above what was held before the step.

    python benchmarks/bench_cross_attention.py                       # CPU, B = 1 2 4, JSON to benchmarks/results
    python benchmarks/bench_cross_attention.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from datamodules.atomic import write_json
from lightning_modules.nets.asycmst_attention import STRATEGY_PATTERNS, CrossModalAttention, attend


def attend_bmm(q, k, v, pattern):
    """Candidate tried for issue 14 item 4 and *not* adopted (BENCHMARKS.md): the spatial / temporal patterns
    as one batched matmul per product over ``(B*M*T)`` / ``(B*M*N)`` rows and one softmax, instead of SDPA.
    Equal to SDPA to 1e-12 in float64 (tested in commit bfc3d80, since reverted); other patterns go to :func:`attend`."""
    if pattern not in ("spatial", "temporal"):
        return attend(q, k, v, pattern)
    b, m, t, n, d = q.shape
    if pattern == "spatial":  # batch (b m t), sequence n: a view when the inputs are contiguous
        q, k, v = (x.reshape(b * m * t, n, d) for x in (q, k, v))
    else:  # batch (b m n), sequence t: one transposing copy per input
        q, k, v = (x.transpose(2, 3).reshape(b * m * n, t, d) for x in (q, k, v))
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(d**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    if pattern == "spatial":
        return out.view(b, m, t, n, d)
    return out.view(b, m, n, t, d).transpose(2, 3)


KEYS = {  # keys per query for each pattern (the "cross" pattern computes N + T scores, one of them masked)
    "spatial": lambda t, n: n,
    "temporal": lambda t, n: t,
    "global": lambda t, n: t * n,
    "cross": lambda t, n: t + n,
}
INTERACTIONS = {  # Table 5, per sample
    "global": lambda t, n: (n * t) * (n * t) * 2,
    "symmetric": lambda t, n: (n * t) * (n + t - 1) * 2,
    "asymmetric": lambda t, n: (n * t) * (n + t),
    "spatial": lambda t, n: (n * t) * n * 2,
    "temporal": lambda t, n: (n * t) * t * 2,
}


def core_flops(strategy: str, b: int, t: int, n: int, d_model: int) -> float:
    """Forward FLOPs of the two attentions: QK^T and PV, ``2 * 2 * keys * D`` per query token and direction."""
    return sum(4.0 * b * t * n * KEYS[p](t, n) * d_model for p in STRATEGY_PATTERNS[strategy])


def proj_flops(b: int, t: int, n: int, d_model: int) -> float:
    """Forward FLOPs of the Q/K/V and output projections of both streams."""
    return 2 * (2.0 * b * t * n * d_model * 4 * d_model)


def naive_loop(q, k, v, q2, k2, v2):
    """Asymmetric attention written as a Python loop over every (t, n) query position (reference only)."""
    b, m, t, n, d = q.shape
    out_c = torch.empty_like(q)
    out_b = torch.empty_like(q2)
    for ti in range(t):
        for ni in range(n):
            # C->B: same frame, all positions of the other stream
            s = torch.einsum("bmd,bmkd->bmk", q[:, :, ti, ni], k[:, :, ti]) * d**-0.5
            out_c[:, :, ti, ni] = torch.einsum("bmk,bmkd->bmd", s.softmax(-1), v[:, :, ti])
            # B->C: same position, all frames of the other stream
            s = torch.einsum("bmd,bmsd->bms", q2[:, :, ti, ni], k2[:, :, :, ni]) * d**-0.5
            out_b[:, :, ti, ni] = torch.einsum("bms,bmsd->bmd", s.softmax(-1), v2[:, :, :, ni])
    return out_c, out_b


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict, device: torch.device, *, repeats: int, warmup: int, memory: bool = True) -> dict:
    """Per name in ``fns`` (each runs forward + backward): median thread-CPU and wall time (ms) over
    ``repeats`` interleaved rounds, and peak extra memory (MiB)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    cpu = {name: [] for name in fns}
    wall = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            _sync(device)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.thread_time() - c0) * 1e3)
    out = {}
    for name, fn in fns.items():
        # on GPU the host thread mostly waits: report wall time as "ms" there
        ms = cpu[name] if device.type == "cpu" else wall[name]
        out[name] = {"ms": statistics.median(ms), "ms_min": min(ms), "wall_ms": statistics.median(wall[name]),
                     "peak_mib": peak_mib(fn, device) if memory else float("nan")}  # fmt: skip
    return out


def peak_mib(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return cpu_peak_mib(fn)


def cpu_peak_mib(fn) -> float:
    """Running peak of CPU tensor allocations during ``fn()`` (torch.profiler memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # each event's *self* allocation balance (frees outside any op arrive as "[memory]" events), in time order
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


class _patched:
    """Within the block, route ``attend`` through :func:`attend_bmm` (the candidate)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            from lightning_modules.nets import asycmst_attention as mod

            self.saved, mod.attend = mod.attend, attend_bmm

    def __exit__(self, *exc):
        if self.on:
            from lightning_modules.nets import asycmst_attention as mod

            mod.attend = self.saved


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (TFLOP/s) in ``dtype``: the compute roof used for the FLOP bounds."""
    size = 4096 if device.type == "cuda" else 1536
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    clock = time.perf_counter if device.type == "cuda" else time.thread_time  # as in measure()
    best = 0.0
    for _ in range(3):  # best of three: the roof, not a loaded moment
        t0 = clock()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * size**3 * reps / (clock() - t0) / 1e12)
    return best


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t, n, d_model, m = args.frames, args.tokens, args.dim, args.heads
    amp = dtype != torch.float32
    roof = matmul_tflops(device, dtype)
    rows = []
    for b in args.batch:
        fns, meta = {}, {}
        strategies = list(args.strategies) + (["asymmetric-bmm"] if "asymmetric" in args.strategies else [])
        for strategy in strategies:
            mod = CrossModalAttention(dim=d_model, heads=m, strategy=strategy.split("-")[0]).to(device)
            x_c = torch.randn(b, t, n, d_model, device=device, requires_grad=True)
            x_b = torch.randn(b, t, n, d_model, device=device, requires_grad=True)
            g_x = [torch.randn(b, t, n, d_model, device=device) for _ in range(2)]
            qkv = [torch.randn(b, m, t, n, d_model // m, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(6)]  # fmt: skip
            g_qkv = [torch.randn(b, m, t, n, d_model // m, device=device, dtype=dtype) for _ in range(2)]
            core = attend_bmm if strategy == "asymmetric-bmm" else attend

            def module_step(mod=mod, x_c=x_c, x_b=x_b, g=g_x, bmm=strategy == "asymmetric-bmm"):
                mod.zero_grad(set_to_none=True)
                x_c.grad = x_b.grad = None
                with torch.autocast(device.type, dtype=dtype, enabled=amp), _patched(bmm):
                    a, c = mod(x_c, x_b)
                torch.autograd.backward([a.float(), c.float()], g)

            pat_c, pat_b = STRATEGY_PATTERNS[strategy.split("-")[0]]

            def core_step(qkv=qkv, g=g_qkv, pat_c=pat_c, pat_b=pat_b, core=core):
                for x in qkv:
                    x.grad = None
                q, k, v, q2, k2, v2 = qkv
                a = core(q, k2, v2, pat_c)
                c = core(q2, k, v, pat_b)
                torch.autograd.backward([a.float(), c.float()], g)

            fl_core = 3 * core_flops(strategy.split("-")[0], b, t, n, d_model)
            fl_mod = fl_core + 3 * proj_flops(b, t, n, d_model)
            for part, fn, fl in (("module", module_step, fl_mod), ("core", core_step, fl_core)):
                fns[(strategy, part)] = fn
                meta[(strategy, part)] = fl
        if b in args.naive_batch:
            qkv_naive = [torch.randn(b, m, t, n, d_model // m, device=device, dtype=dtype, requires_grad=True)
                         for _ in range(6)]  # fmt: skip

            def naive_step(qkv=qkv_naive, g=g_qkv):
                q, k, v, q2, k2, v2 = qkv
                a, c = naive_loop(q, k2, v2, q2, k, v)
                torch.autograd.backward([a.float(), c.float()], g)

            r = measure({"naive": naive_step}, device, repeats=max(1, args.repeats // 3), warmup=1)["naive"]
            fl = 3 * core_flops("asymmetric", b, t, n, d_model)
            bound = fl / (roof * 1e12) * 1e3
            rows.append({"batch": b, "strategy": "asymmetric-naive-loop", "part": "core", **r, "gflop": fl / 1e9,
                         "bound_ms": bound, "x_bound": r["ms"] / bound,
                         "interactions": INTERACTIONS["asymmetric"](t, n) * b})  # fmt: skip
            print(f"B={b} naive-loop  core   {r['ms']:9.2f} ms  {r['peak_mib']:8.1f} MiB", flush=True)
        results = measure(fns, device, repeats=args.repeats, warmup=args.warmup)
        for (strategy, part), r in results.items():
            fl = meta[(strategy, part)]
            bound = fl / (roof * 1e12) * 1e3
            rows.append({"batch": b, "strategy": strategy, "part": part, **r, "gflop": fl / 1e9,
                         "bound_ms": bound, "x_bound": r["ms"] / bound,
                         "interactions": INTERACTIONS[strategy.split("-")[0]](t, n) * b})  # fmt: skip
            print(f"B={b} {strategy:15s} {part:6s} {r['ms']:9.2f} ms (wall {r['wall_ms']:8.2f})  "
                  f"{r['peak_mib']:8.1f} MiB  {fl / 1e9:7.2f} GFLOP  x{r['ms'] / bound:6.2f} of bound",
                  flush=True)  # fmt: skip

    def pick(b, s, part):
        return next((r for r in rows if (r["batch"], r["strategy"], r["part"]) == (b, s, part)), None)

    ratios = []
    for b in args.batch:
        for part in ("module", "core"):
            asym = pick(b, "asymmetric", part)
            if asym is None:
                continue
            entry = {"batch": b, "part": part}
            for other in ("global", "symmetric", "asymmetric-bmm", "asymmetric-naive-loop"):
                o = pick(b, other, part)
                if o is not None:
                    entry[f"{other}_over_asym_time"] = o["ms"] / asym["ms"]
                    entry[f"{other}_over_asym_mem"] = o["peak_mib"] / max(asym["peak_mib"], 1e-9)
            ratios.append(entry)
    return {
        "benchmark": "cross_attention",
        "shape": {"T": t, "N": n, "D": d_model, "M": m},
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "matmul_tflops": roof,
        "rows": rows,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--naive-batch", type=int, nargs="*", default=[1])
    p.add_argument(
        "--strategies", nargs="+", default=["asymmetric", "symmetric", "global", "spatial", "temporal"]
    )
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--tokens", type=int, default=49)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = args.out or Path(__file__).parent / "results" / f"cross_attention_{result['device_type']}.json"
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
