"""Step cost of the dual-condition pass, side by side in one process, plus FLOPs per step.

Runs the real ``pogdiff_dist.train.step.DualConditionStep`` (noise, psi, neighbour draw, y'
text encoding, UNet call(s), loss) followed by ``loss.backward()`` on one micro-batch:

  vanilla              method=vanilla: 1 forward + backward (the reference)
  full_f<f>            neighbor_grad=full: one batched [x_t; x_t] UNet call, a fraction f of psi = 0
  full_two_calls       the same step with the batched call split into two UNet calls
  stop_f<f>            neighbor_grad=stop: the y' pass under no_grad, a fraction f of psi = 0
  full_unet_only,      full / stop with y' hidden states given (no text encoder): the UNet's
  stop_unet_only       share of the cost alone
  full_cached,         the real step with the y' caption cache (train.text_cache_mib) warm: every
  stop_cached          neighbour caption already encoded, as in training once each distinct
                       caption has been drawn (the other cases run with the cache off)
  text_encode          encoding B neighbour captions (what y' costs before the UNet sees it)

Targets (forward = 1, backward = 2 units, so ideal ratios 2.0 and 1.33): full <= 2.0x
vanilla and faster than two calls; stop <= 1.40x vanilla; with a fraction f of psi = 0
the extra cost over vanilla shrinks by about f. FLOPs come from torch's FlopCounterMode
over the same calls (backward included); achieved FLOP/s = FLOPs / median time, set
against a large sgemm at the same thread count.

    .venv/bin/python benchmarks/step_cost.py                 # the suite's figures
    .venv/bin/python benchmarks/step_cost.py --sweep         # ratios vs batch size and threads
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from _common import interleaved, medians, spread, write_result
from torch.utils.flop_counter import FlopCounterMode

from pogdiff_dist.config import LossConfig, ModelConfig
from pogdiff_dist.data.shards import Batch
from pogdiff_dist.models import ModelSpec, TextEncoder, build_noise_scheduler, build_unet, bundled_text_encoder_dir
from pogdiff_dist.train.step import DualConditionStep

K = 5  # neighbours per sample in the synthetic batch
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def make_batch(b: int, channels: int, size: int, ctx: tuple[int, int], zero_frac: float, vocab: int) -> Batch:
    """A micro-batch whose first round(f * b) samples get psi = 0 (no neighbour with positive
    similarity, so psi_img = 0), the rest psi = 0.9 (same identity, similarity 0.9)."""
    g = torch.Generator().manual_seed(1)
    n_zero = round(zero_frac * b)
    sim = torch.full((b, K), 0.9)
    sim[:n_zero] = 0.0
    length, _ = ctx
    return Batch(
        x0=torch.randn(b, channels, size, size, generator=g),
        y=torch.randn(b, *ctx, generator=g).half(),
        nbr_tokens=torch.randint(1000, min(vocab, 20000), (b, K, length), generator=g),
        nbr_len=torch.full((b, K), length),
        nbr_sim=sim,
        nbr_same=torch.ones(b, K, dtype=torch.uint8),
        elbo=torch.zeros(b, dtype=torch.float64),
        index=torch.arange(b),
    )


class GivenHiddenStates:
    """A text encoder that costs nothing: isolates the UNet's share of the step."""

    device = torch.device("cpu")

    def __init__(self, ctx: tuple[int, int]):
        self.ctx = ctx

    def encode_ids(self, ids: torch.Tensor, lengths: torch.Tensor):
        n = ids.shape[0]
        return torch.ones(n, *self.ctx), torch.ones(n, self.ctx[1])


class TwoCalls:
    """The UNet with any call on more than ``b`` samples split into a first call on ``b`` and
    a second on the rest: DualConditionStep's batched ``full`` call as two separate calls."""

    def __init__(self, unet, b: int):
        self.unet, self.b = unet, b

    def __call__(self, x, t, encoder_hidden_states):
        b = self.b
        if x.shape[0] <= b:
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        first = self.unet(x[:b], t[:b], encoder_hidden_states=encoder_hidden_states[:b]).sample
        second = self.unet(x[b:], t[b:], encoder_hidden_states=encoder_hidden_states[b:]).sample
        return SimpleNamespace(sample=torch.cat([first, second]))


def sgemm_gflops(n: int = 1024, reps: int = 5) -> tuple[float, float]:
    """Achievable matmul GFLOP/s at the current thread count (the 'peak' for utilisation),
    per wall-second and per CPU-second."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        a @ b
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 2 * n**3 / statistics.median(wall) / 1e9, 2 * n**3 / statistics.median(cpu) / 1e9


def build(args, text):
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet=args.unet), ModelSpec(args.channels, args.size, args.ctx[1]))
    sched = build_noise_scheduler(ModelConfig(unet=args.unet))
    uncond = torch.zeros(*args.ctx)
    elbo = torch.zeros(100)

    def stepper(method: str, grad: str = "full", encoder=text, cache_mib: float = 0.0):
        return DualConditionStep(LossConfig(method=method, neighbor_grad=grad, k=K), sched, encoder, uncond, elbo,
                                 caption_dropout=0.0, text_cache_mib=cache_mib)

    return unet, stepper


SWEEP_CASES = ("vanilla", "full_f0.0", "full_two_calls", "stop_f0.0", "full_unet_only", "stop_unet_only", "full_cached",
               "stop_cached", "text_encode")


def measure(args, reps: int, with_flops: bool, only: tuple[str, ...] | None = None) -> dict:
    """One configuration (batch, threads): every case interleaved, medians and ratios."""
    torch.set_num_threads(args.threads)
    text = TextEncoder(bundled_text_encoder_dir(), bundled_text_encoder_dir(), args.ctx[0])
    unet, stepper = build(args, text)
    b = args.batch
    vocab = text.tokenizer.vocab_size
    batches = {f: make_batch(b, args.channels, args.size, tuple(args.ctx), f, vocab) for f in FRACTIONS}
    vanilla, full, stop = stepper("vanilla"), stepper("pogdiff", "full"), stepper("pogdiff", "stop")
    given = GivenHiddenStates(tuple(args.ctx))
    full_given, stop_given = stepper("pogdiff", "full", given), stepper("pogdiff", "stop", given)
    full_cached, stop_cached = (stepper("pogdiff", g, cache_mib=256.0) for g in ("full", "stop"))

    def run(step, model, batch):
        def fn():
            loss, _ = step(model, batch, torch.Generator().manual_seed(0))
            loss.backward()
        return fn

    b0 = batches[0.0]
    cases = {"vanilla": run(vanilla, unet, b0)}
    cases.update({f"full_f{f}": run(full, unet, batches[f]) for f in FRACTIONS})
    cases["full_two_calls"] = run(full, TwoCalls(unet, b), b0)
    cases.update({f"stop_f{f}": run(stop, unet, batches[f]) for f in FRACTIONS})
    cases["full_unet_only"] = run(full_given, unet, b0)
    cases["stop_unet_only"] = run(stop_given, unet, b0)
    cases["full_cached"] = run(full_cached, unet, b0)  # warm after the warm-up repetition
    cases["stop_cached"] = run(stop_cached, unet, b0)
    cases["text_encode"] = lambda: text.encode_ids(b0.nbr_tokens[:, 0], b0.nbr_len[:, 0])

    if only:
        cases = {k: v for k, v in cases.items() if k in only}
    times, cpu = interleaved(cases, reps, warmup=1, after=lambda: unet.zero_grad(set_to_none=True))
    med, med_cpu = medians(times), medians(cpu)
    van = med["vanilla"]
    out = {
        "batch": b, "threads": args.threads, "reps": reps,
        "params": sum(p.numel() for p in unet.parameters()),
        "median_s": med, "ratio_to_vanilla": {k: v / van for k, v in med.items()},
        "iqr_over_median": {k: spread(v) for k, v in times.items()},
        "cpu_median_s": med_cpu, "cpu_ratio_to_vanilla": {k: v / med_cpu["vanilla"] for k, v in med_cpu.items()},
        "all_s": times, "all_cpu_s": cpu,
    }
    # Extra cost over vanilla at psi-zero fraction f, relative to f = 0 (ideal: 1 - f).
    pairs = () if only else (("extra_cost_rel", med), ("cpu_extra_cost_rel", med_cpu))
    for key, m in pairs:
        out[key] = {mode: {str(f): (m[f"{mode}_f{f}"] - m["vanilla"]) / (m[f"{mode}_f0.0"] - m["vanilla"])
                           for f in FRACTIONS} for mode in ("full", "stop")}
    if with_flops:
        flops = {}
        for name in ("vanilla", "full_f0.0", "stop_f0.0", "full_unet_only", "stop_unet_only", "full_cached",
                     "stop_cached", "text_encode"):
            with FlopCounterMode(display=False) as counter:
                cases[name]()
            unet.zero_grad(set_to_none=True)
            flops[name] = counter.get_total_flops()
        peak, peak_cpu = sgemm_gflops()
        out["flops"] = {
            "per_step": flops,
            "per_sample": {k: v / b for k, v in flops.items()},
            "ratio_to_vanilla": {k: v / flops["vanilla"] for k, v in flops.items()},
            "achieved_gflops": {k: v / med[k] / 1e9 for k, v in flops.items()},
            "achieved_gflops_per_cpu_s": {k: v / med_cpu[k] / 1e9 for k, v in flops.items()},
            "sgemm_gflops": peak, "sgemm_gflops_per_cpu_s": peak_cpu,
            "utilisation_vs_sgemm": {k: v / med[k] / 1e9 / peak for k, v in flops.items()},
            "utilisation_vs_sgemm_cpu": {k: v / med_cpu[k] / 1e9 / peak_cpu for k, v in flops.items()},
        }
    return out


def targets(r: dict) -> dict:
    """Each target on wall-clock medians (``value``), with the process-CPU-time figure
    (``cpu_value``) as a cross-check that is less disturbed by other load on the machine."""
    out = {}
    for key in ("median_s", "cpu_median_s"):
        med = r[key]
        van = med["vanilla"]
        shrink = {mode: {f: (med[f"{mode}_f{f}"] - van) / (med[f"{mode}_f0.0"] - van) for f in FRACTIONS}
                  for mode in ("full", "stop")}
        worst = max(abs(v - (1 - f)) for mode in shrink.values() for f, v in mode.items())
        values = {
            "full_le_2.0x": (med["full_f0.0"] / van, "<= 2.0", med["full_f0.0"] / van <= 2.0),
            "full_faster_than_two_calls": (med["full_f0.0"] / med["full_two_calls"], "< 1.0 (full / two calls)",
                                           med["full_f0.0"] < med["full_two_calls"]),
            "stop_le_1.40x": (med["stop_f0.0"] / van, "<= 1.40", med["stop_f0.0"] / van <= 1.40),
            "full_cached_le_2.0x": (med["full_cached"] / van, "<= 2.0", med["full_cached"] / van <= 2.0),
            "stop_cached_le_1.40x": (med["stop_cached"] / van, "<= 1.40", med["stop_cached"] / van <= 1.40),
            "extra_cost_shrinks_by_f": (worst, "max |extra(f)/extra(0) - (1-f)| <= 0.15", worst <= 0.15),
        }
        for name, (value, target, met) in values.items():
            t = out.setdefault(name, {"target": target})
            if key == "median_s":
                t.update(value=value, met=bool(met))
            else:
                t.update(cpu_value=value, cpu_met=bool(met))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--ctx", type=int, nargs=2, default=(32, 384), metavar=("L", "D"),
                   help="caption tokens and hidden size (MiniLM: 384)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a training worker uses cpus_per_worker)")
    p.add_argument("--sweep", action="store_true",
                   help="investigation: f = 0 ratios over --sweep-batches x --sweep-threads (3 reps each; "
                        "CPU-time ratios printed)")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=(4, 8, 16))
    p.add_argument("--sweep-threads", type=int, nargs="+", default=(1, 2))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    if args.sweep:
        rows = []
        for threads in args.sweep_threads:
            for batch in args.sweep_batches:
                a = argparse.Namespace(**{**vars(args), "batch": batch, "threads": threads})
                r = measure(a, reps=3, with_flops=False, only=SWEEP_CASES)
                rows.append({k: r[k] for k in ("batch", "threads", "median_s", "ratio_to_vanilla",
                                               "cpu_median_s", "cpu_ratio_to_vanilla")})
                rt = r["cpu_ratio_to_vanilla"]
                print(f"threads {threads} batch {batch:>2}: vanilla {r['median_s']['vanilla'] * 1e3:7.1f} ms  "
                      f"full {rt['full_f0.0']:.2f}x  two-call {rt['full_two_calls']:.2f}x  stop {rt['stop_f0.0']:.2f}x  "
                      f"stop(UNet only) {rt['stop_unet_only']:.2f}x  text-enc {rt['text_encode']:.2f}x", flush=True)
        write_result("step_cost_sweep", {"config": vars(args), "rows": rows}, args.out)
        return

    r = measure(args, args.reps, with_flops=True)
    r["targets"] = targets(r)
    # One thread: process CPU time is the work done whatever else runs on the machine, so
    # the targets are judged on it; wall-clock medians are kept beside it.
    r["targets_judged_on"] = "cpu_time" if args.threads == 1 else "wall"
    write_result("step_cost", {"config": vars(args), **r}, args.out)
    print(f"{'case':<18}{'median ms':>10}{'x vanilla':>10}{'IQR/med':>9}{'CPU x van':>10}{'GFLOP':>9}{'GFLOP/s':>9}")
    fl = r["flops"]
    for k, v in r["median_s"].items():
        gf = fl["per_step"].get(k)
        print(f"{k:<18}{v * 1e3:>10.1f}{r['ratio_to_vanilla'][k]:>10.2f}{r['iqr_over_median'][k]:>9.2f}"
              f"{r['cpu_ratio_to_vanilla'][k]:>10.2f}"
              + (f"{gf / 1e9:>9.2f}{fl['achieved_gflops'][k]:>9.1f}" if gf else ""))
    print(f"sgemm at {args.threads} thread(s): {fl['sgemm_gflops']:.1f} GFLOP/s "
          f"({fl['sgemm_gflops_per_cpu_s']:.1f} per CPU-second)")
    for name, t in r["targets"].items():
        print(f"target {name}: {t['value']:.3f} ({t['target']}) {'MET' if t['met'] else 'MISSED'}"
              f" [CPU time: {t['cpu_value']:.3f} {'met' if t['cpu_met'] else 'missed'}]")


if __name__ == "__main__":
    main()
