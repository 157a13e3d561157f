"""Recurrent kernels at real lengths on a CUDA device: packed (boundaries) == each sequence alone.

For every kernel that ``hf_varlen_patch.recurrent.kernels`` can route packed calls to, in bf16:
sequences of 1 to 4000 tokens (most boundaries inside the kernels' chunks) packed into one row and
run once with their boundaries (``cu_seqlens`` / ``seq_idx``, as the routers pass them), against
each sequence run alone through the same kernel without boundaries. The tolerance is bf16's own
noise: ``noise`` is how far the separate bf16 runs are from the exact torch ops
(:mod:`hf_varlen_patch.recurrent.torch_ops`) in float32 on the same sequences; a kernel passes when
packed and separate differ by at most ``2 * noise`` for the output and for every gradient (inputs
and shared parameters), as tests/test_gpu.py judges whole models. The control: the same row run
without its boundaries must differ from the separate runs by more than ``2 * noise`` (else the
inputs could not show a leak and the kernel does not pass). Relative errors are
``||a - b|| / ||b||`` over the whole tensor. Also times packed forward+backward of the kernel and
of the torch ops (the same packed row, medians of CUDA-event timings).

    python scripts/gpu_kernel_check.py --out benchmarks/recurrent_kernel_check.json [--only gdn,kda]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_varlen_patch.recurrent import torch_ops

LENGTHS = [1, 4000, 37, 64, 65, 1500, 2, 3000, 777, 129]
DEVICE = "cuda"  # --control-only may run on the CPU


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def make_inputs(spec: dict, total: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 master copies of every input (per-token tensors have the token axis at 1)."""
    out = {}
    for name, (shape, kind) in spec["inputs"].items():
        shape = tuple(total if s == "T" else s for s in shape)
        x = torch.randn(shape, generator=gen, device=DEVICE)
        if kind == "logdecay":  # log-space decay, mean about -0.1 per step
            x = -0.15 * F.softplus(x)
        elif kind == "beta":
            x = torch.sigmoid(x)
        elif kind == "A":  # Mamba2: A = -exp(A_log), A_log in log(1..16)
            x = -torch.exp(torch.empty(shape, device=DEVICE).uniform_(0, 2.77, generator=gen))
        elif kind == "dt":
            x = x - 2.0
        elif kind == "small":
            x = 0.5 * x
        out[name] = x
    return out


def _progress(what: str, since: float) -> None:
    """A phase's end on stdout: first use compiles and autotunes every Triton kernel (minutes)."""
    torch.cuda.synchronize()
    print(f"   {what}: {time.time() - since:.1f} s", flush=True)


def run_case(spec: dict, kernel, lengths: list[int], seed: int = 0) -> dict:
    start = time.time()
    total = sum(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    master = make_inputs(spec, total, gen)
    tokenwise = [n for n, (shape, _) in spec["inputs"].items() if "T" in shape]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE, dtype=torch.int64)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))
    seq_idx = seq_idx[None].to(torch.int32)
    out_shape = spec["out_shape"](master)
    weight = torch.randn(out_shape, generator=gen, device=DEVICE)  # the loss: sum(out * weight)

    def leaves():  # float32 leaves cast to the run's dtype inside: shared parameters' gradients
        # accumulate over the separate runs in float32, as a trainer's float32 parameters do
        return {k: v.detach().clone().requires_grad_(spec["grad"](k)) for k, v in master.items()}

    def cast(tensors, dtype):
        return {k: v.to(dtype) for k, v in tensors.items()}

    def backward(out, w):
        (out.float() * w).sum().backward()

    # packed, one call with boundaries
    packed_in = leaves()
    packed_out = spec["packed"](kernel, cast(packed_in, torch.bfloat16), cu, seq_idx)
    backward(packed_out, weight)
    _progress("packed forward+backward (first use: Triton compiles and autotunes)", start)
    packed = {
        "out": packed_out.detach().float(),
        **{k: v.grad.float() for k, v in packed_in.items() if v.grad is not None},
    }

    def separate(dtype, fn):
        shared = {k: v for k, v in leaves().items() if k not in tokenwise}
        outs, grads = [], {k: [] for k in tokenwise}
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            sl = {k: master[k][:, a:b].detach().clone().requires_grad_(spec["grad"](k)) for k in tokenwise}
            o = fn(cast({**sl, **shared}, dtype))
            backward(o, weight[:, a:b])
            outs.append(o.detach().float())
            for k in tokenwise:
                if sl[k].grad is not None:
                    grads[k].append(sl[k].grad.float())
        res = {"out": torch.cat(outs, 1)}
        res.update({k: torch.cat(v, 1) for k, v in grads.items() if v})
        res.update({k: v.grad.float() for k, v in shared.items() if v.grad is not None})
        return res

    sep = separate(torch.bfloat16, lambda t: spec["alone"](kernel, t))
    _progress("each sequence alone, bf16 kernel", start)
    truth = separate(torch.float32, spec["truth"])
    _progress("each sequence alone, float32 torch ops", start)
    with torch.no_grad():  # the control: the same row without its boundaries must be seen to leak
        joined = spec["alone"](kernel, cast(master, torch.bfloat16)).float()
    leak, noise_out = rel(joined, sep["out"]), rel(sep["out"], truth["out"])
    rows = {}
    for name in packed:
        err, noise = rel(packed[name], sep[name]), rel(sep[name], truth[name])
        ok = err <= 2 * noise or err == 0.0
        rows[name] = dict(
            err=err,
            noise=noise,
            ratio=err / noise if noise else 0.0,
            packed_vs_exact=rel(packed[name], truth[name]),
            ok=ok and bool(torch.isfinite(packed[name]).all()),
        )
    kernel_vs_truth = rel(packed["out"], truth["out"])
    sees_leaks = leak > 2 * noise_out
    return dict(
        tensors=rows,
        packed_vs_exact_out=kernel_vs_truth,
        leak_without_boundaries=leak,
        sees_leaks=sees_leaks,
        ok=sees_leaks and all(r["ok"] for r in rows.values()),
    )


def leak_control(spec: dict, lengths: list[int], seed: int = 0) -> dict:
    """How far the same inputs run as one row without boundaries land from each sequence alone,
    with the exact float32 torch ops (the function every kernel computes): the size of the leak the
    check's inputs would show, to compare with bf16's noise (about 5e-3 here)."""
    total = sum(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    master = make_inputs(spec, total, gen)
    tokenwise = [n for n, (shape, _) in spec["inputs"].items() if "T" in shape]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.no_grad():
        joined = spec["truth"](master)
        alone = torch.cat(
            [spec["truth"]({k: (v[:, a:b] if k in tokenwise else v) for k, v in master.items()})
             for a, b in zip(cu[:-1], cu[1:])], 1,
        )  # fmt: skip
    first = [alone[:, a : a + 16] for a in cu[1:-1]], [joined[:, a : a + 16] for a in cu[1:-1]]
    return dict(
        leak_without_boundaries=rel(joined, alone),
        leak_first_16_tokens_after_each_boundary=rel(torch.cat(first[1], 1), torch.cat(first[0], 1)),
    )


def time_packed(spec: dict, kernel, lengths: list[int], reps: int = 5) -> dict:
    """Median ms of one packed forward+backward: the kernel, and the exact torch ops."""
    total = sum(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    master = make_inputs(spec, total, gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE, dtype=torch.int64)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))
    seq_idx = seq_idx[None].to(torch.int32)
    res = {}
    for label, fn in (
        ("kernel", lambda t: spec["packed"](kernel, t, cu, seq_idx)),
        ("torch_ops", lambda t: spec["torch_packed"](t, seq_idx)),
    ):
        times = []
        for _ in range(reps + 1):
            t = {k: v.to(torch.bfloat16).detach().clone().requires_grad_(spec["grad"](k)) for k, v in master.items()}
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(t).float().sum().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        res[f"{label}_ms"] = sorted(times[1:])[len(times[1:]) // 2]
    return res


# ---- the kernels, as the routers call them --------------------------------------------------------

H, HV, K, V = 8, 16, 128, 128


def _gdn_spec(per_dim: bool) -> dict:
    g_shape = (1, "T", HV, K) if per_dim else (1, "T", HV)
    keys = ("q", "k", "v", "g", "beta")

    def call(kernel, t, cu=None):
        out, _ = kernel(
            t["q"],
            t["k"],
            t["v"],
            t["g"],
            t["beta"],
            use_qk_l2norm_in_kernel=True,
            **({"cu_seqlens": cu} if cu is not None else {}),
        )
        return out

    def exact(t, seq):
        out, _ = torch_ops.chunked_delta_rule(*(t[k] for k in keys), seq, use_qk_l2norm_in_kernel=True)
        return out

    return dict(
        inputs={"q": ((1, "T", H, K), "normal"), "k": ((1, "T", H, K), "normal"), "v": ((1, "T", HV, V), "normal"),
                "g": (g_shape, "logdecay"), "beta": ((1, "T", HV), "beta")},
        grad=lambda name: True,
        out_shape=lambda m: (1, m["v"].shape[1], HV, V),
        packed=lambda kernel, t, cu, seq: call(kernel, t, cu),
        alone=lambda kernel, t: call(kernel, t),
        truth=lambda t: exact(t, torch.zeros(1, t["q"].shape[1], dtype=torch.int32, device=DEVICE)),
        torch_packed=exact,
    )  # fmt: skip


CONV_D, CONV_W = 4096, 4


def _conv_spec() -> dict:
    def call(kernel, t, cu=None):
        y, _ = kernel(
            t["x"], t["weight"], t["bias"], activation="silu", **({"cu_seqlens": cu} if cu is not None else {})
        )
        return y

    def exact(t, seq):  # torch_ops take (B, D, T)
        return torch_ops.causal_conv1d(t["x"].transpose(1, 2), t["weight"], t["bias"], seq, F.silu).transpose(1, 2)

    return dict(
        inputs={"x": ((1, "T", CONV_D), "normal"), "weight": ((CONV_D, CONV_W), "small"), "bias": ((CONV_D,), "small")},
        grad=lambda name: True,
        out_shape=lambda m: tuple(m["x"].shape),
        packed=lambda kernel, t, cu, seq: call(kernel, t, cu),
        alone=lambda kernel, t: call(kernel, t),
        truth=lambda t: exact(t, torch.zeros(1, t["x"].shape[1], dtype=torch.int32, device=DEVICE)),
        torch_packed=exact,
    )  # fmt: skip


SSD_H, SSD_P, SSD_N, SSD_CHUNK = 32, 64, 128, 256


def _ssd_spec() -> dict:
    def call(kernel, t, seq=None):
        return kernel(t["x"], t["dt"], t["A"], t["B"], t["C"], SSD_CHUNK, D=t["D"], dt_bias=t["dt_bias"],
                      dt_softplus=True, **({"seq_idx": seq} if seq is not None else {}))  # fmt: skip

    def exact(t, seq):
        return torch_ops.chunked_ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], SSD_CHUNK, seq, D=t["D"],
                                          dt_bias=t["dt_bias"], dt_softplus=True)  # fmt: skip

    return dict(
        inputs={"x": ((1, "T", SSD_H, SSD_P), "normal"), "dt": ((1, "T", SSD_H), "dt"), "A": ((SSD_H,), "A"),
                "B": ((1, "T", 1, SSD_N), "small"), "C": ((1, "T", 1, SSD_N), "small"), "D": ((SSD_H,), "normal"),
                "dt_bias": ((SSD_H,), "small")},
        grad=lambda name: True,
        out_shape=lambda m: tuple(m["x"].shape),
        packed=lambda kernel, t, cu, seq: call(kernel, t, seq),
        alone=lambda kernel, t: call(kernel, t),
        truth=lambda t: exact(t, torch.zeros(1, t["x"].shape[1], dtype=torch.int32, device=DEVICE)),
        torch_packed=exact,
    )  # fmt: skip


CASES = {
    "gdn": ("gated_delta_rule", _gdn_spec(per_dim=False)),
    "kda": ("kda", _gdn_spec(per_dim=True)),
    "conv": ("fla_causal_conv1d", _conv_spec()),
    "ssd": ("ssd_chunk_scan", _ssd_spec()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--out", default="benchmarks/recurrent_kernel_check.json")
    parser.add_argument("--control-only", action="store_true", help="only the leak control, float32 torch ops")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.control_only:
        lengths = [int(n) for n in args.lengths.split(",")]
        for case in args.only.split(","):
            name, spec = CASES[case]
            r = leak_control(spec, lengths)
            print(f"{name}: the row without boundaries vs each sequence alone {r['leak_without_boundaries']:.2e} "
                  f"(first 16 tokens after each boundary {r['leak_first_16_tokens_after_each_boundary']:.2e})",
                  flush=True)  # fmt: skip
        return
    from hf_varlen_patch.recurrent import kernels

    lengths = [int(n) for n in args.lengths.split(",")]
    import transformers
    import triton

    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, lengths=lengths)  # fmt: skip
    try:
        import fla

        meta["fla"] = fla.__version__
    except Exception as err:  # noqa: BLE001
        meta["fla"] = f"not importable: {err}"
    print(json.dumps(meta), flush=True)
    results = {"meta": meta, "kernels": {}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for case in args.only.split(","):
        name, spec = CASES[case]
        kernel = kernels._load(name)
        start = time.time()
        if kernel is None:
            module, attr = kernels.KERNELS[name]
            try:
                __import__(module)
                why = f"{module} has no {attr}"
            except Exception as err:  # noqa: BLE001
                why = f"{type(err).__name__}: {err}"
            results["kernels"][name] = dict(ok=False, error=f"not loadable: {why}")
        else:
            try:
                res = run_case(spec, kernel, lengths)
                res.update(time_packed(spec, kernel, lengths))
                results["kernels"][name] = res
            except Exception as err:  # noqa: BLE001
                results["kernels"][name] = dict(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
                traceback.print_exc()
        results["kernels"][name]["seconds"] = round(time.time() - start, 1)
        r = results["kernels"][name]
        print(f"== {name}: {'PASS' if r['ok'] else 'FAIL'} ({r['seconds']} s) {r.get('error', '')}", flush=True)
        for t, row in r.get("tensors", {}).items():
            verdict = "ok" if row["ok"] else "FAIL"
            print(f"   {t:8s} packed vs alone {row['err']:.2e}  bf16 noise {row['noise']:.2e}  "
                  f"ratio {row['ratio']:.2f} {verdict} (packed vs exact {row['packed_vs_exact']:.2e})")  # fmt: skip
        if "leak_without_boundaries" in r:
            print(f"   control: the row without boundaries vs alone {r['leak_without_boundaries']:.2e} "
                  f"({'a leak shows' if r['sees_leaks'] else 'NO LEAK VISIBLE: proves nothing'})")  # fmt: skip
        if "kernel_ms" in r:
            print(f"   packed fwd+bwd: kernel {r['kernel_ms']:.2f} ms, torch ops {r['torch_ops_ms']:.2f} ms; "
                  f"packed kernel vs exact fp32 output {r['packed_vs_exact_out']:.2e}", flush=True)  # fmt: skip
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
