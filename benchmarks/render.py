"""Render benchmarks/results/*.json into results/summary.md (tables, targets) and summary.png.

    .venv/bin/python benchmarks/render.py
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import RESULTS


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out + [""]


def mark(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


def targets_rows(res: dict) -> list[list]:
    rows = []
    sc, pipe, knn = res.get("step_cost"), res.get("input_pipeline"), res.get("knn_build")
    if sc:
        names = {"full_le_2.0x": "full step <= 2.0x vanilla", "full_faster_than_two_calls": "full: batched faster than two calls",
                 "stop_le_1.40x": "stop step <= 1.40x vanilla",
                 "full_cached_le_2.0x": "full step, y' caption cache warm, <= 2.0x vanilla",
                 "stop_cached_le_1.40x": "stop step, y' caption cache warm, <= 1.40x vanilla",
                 "extra_cost_shrinks_by_f": "extra cost shrinks by f (psi = 0)"}
        on_cpu = sc["config"]["threads"] == 1  # single-threaded: judged on process CPU time
        for key, label in names.items():
            if key not in sc["targets"]:
                continue
            t = sc["targets"][key]
            judged = (t["cpu_value"], t["cpu_met"]) if on_cpu else (t["value"], t["met"])
            rows.append([label, t["target"], f"{judged[0]:.3f}", mark(judged[1]),
                         f"{t['value']:.3f} ({'met' if t['met'] else 'missed'})" if on_cpu else f"{t['cpu_value']:.3f}"])
    if pipe:
        for key, label in (("stream_ge_3x_consumption", "stream >= 3x training consumption"),
                           ("data_wait_lt_5pct", "data wait < 5% of step time")):
            t = pipe["targets"][key]
            rows.append([label, t["target"], f"{t['value']:.3f}", mark(t["met"]), ""])
    if knn:
        for r in knn["rows"]:
            t = r["target"]
            rows.append([f"build_knn within 1.5x of matmul+topk, N={r['n']:,}", t["target"], f"{t['value']:.2f}",
                         mark(t["met"]), f"{r.get('build_over_lower_bound_wall', t['value']):.2f}"])
    rows.append(["GPU: vanilla >= 40% MFU (H100), stop >= 0.72x vanilla, faiss 1M x 768 < 60 s", "", "not measured",
                 "n/a (no GPU in this session)", ""])
    return rows


def render_md(res: dict) -> str:
    run = res.get("run_all") or {}
    md = ["# CPU benchmark summary", "",
          f"Command: `{run.get('command', '.venv/bin/python benchmarks/run_all.py')}`"
          + (f" ({run['total_s'] / 60:.1f} min, {run.get('when', '')})" if run.get("total_s") else ""), "",
          ("Measured side by side on a shared 2-core CPU machine while other jobs ran (load averages below): "
          "medians over repetitions, ratios to a reference measured in the same process, wall-clock and "
          "process CPU time."), ""]
    if run.get("benchmarks"):
        md += table(["benchmark", "status", "seconds", "load avg (1 min) at start"],
                    [[b["name"], b["status"], b["seconds"], b.get("loadavg_start", "")] for b in run["benchmarks"]])
    md += ["## Targets", ""]
    md += [("Single-threaded benchmarks (step cost, k-NN) are judged on process CPU time, which other jobs on the "
           "machine do not inflate; their wall-clock medians are in the last column. The input-pipeline figures "
           "are wall-clock (several processes)."), ""]
    md += table(["target", "goal", "measured", "", "wall-clock median"], targets_rows(res))

    sc = res.get("step_cost")
    if sc:
        c = sc["config"]
        md += [(f"## 1-2. Step cost and FLOPs (DualConditionStep + backward; UNet {c['unet']} {sc['params'] / 1e6:.2f}M params, "
               f"batch {c['batch']}, {c['channels']}x{c['size']}x{c['size']}, context {c['ctx'][0]}x{c['ctx'][1]}, "
               f"{c['threads']} thread, {sc['reps']} reps)"), ""]
        fl = sc["flops"]
        rows = []
        for k, v in sc["median_s"].items():
            gf = fl["per_step"].get(k)
            rows.append([k, sc["cpu_median_s"][k] * 1e3, v * 1e3, sc["cpu_ratio_to_vanilla"][k], sc["ratio_to_vanilla"][k],
                         sc["iqr_over_median"][k], gf / 1e9 if gf else "",
                         gf / sc["cpu_median_s"][k] / 1e9 if gf else "", gf / v / 1e9 if gf else ""])
        md += table(["case", "CPU ms", "wall ms", "x vanilla (CPU time)", "x vanilla (wall)", "wall IQR / median",
                     "GFLOP / step", "GFLOP per CPU-s", "GFLOP per wall-s"], rows)
        van_cpu = fl["per_step"]["vanilla"] / sc["cpu_median_s"]["vanilla"] / 1e9
        sg = fl.get("sgemm_gflops_per_cpu_s")
        md += [f"Matmul reference at the same thread count (sgemm 1024^3): {fl['sgemm_gflops']:.1f} GFLOP per wall-second"
               + (f", {sg:.1f} per CPU-second" if sg else "")
               + f"; the vanilla step does {van_cpu:.1f} GFLOP per CPU-second"
               + (f" ({van_cpu / sg:.0%} of sgemm). " if sg else ". ")
               + "FLOP ratios to vanilla: "
               + ", ".join(f"{k} {v:.2f}x" for k, v in fl["ratio_to_vanilla"].items()) + ".", ""]
        rows = [[f, sc["extra_cost_rel"]["full"][f], sc["extra_cost_rel"]["stop"][f],
                 sc["cpu_extra_cost_rel"]["full"][f], sc["cpu_extra_cost_rel"]["stop"][f], 1 - float(f)]
                for f in sc["extra_cost_rel"]["full"]]
        md += ["Extra cost over vanilla at a fraction f of psi = 0 samples, relative to f = 0:", ""]
        md += table(["f", "full (wall)", "stop (wall)", "full (CPU)", "stop (CPU)", "ideal 1 - f"], rows)
    sweep = res.get("step_cost_sweep")
    if sweep:
        md += ["Investigation (`step_cost.py --sweep`, CPU-time ratios to vanilla, f = 0):", ""]
        md += table(["threads", "batch", "vanilla ms (wall)", "full", "two calls", "stop", "full UNet only",
                     "stop UNet only", "text encode"],
                    [[r["threads"], r["batch"], r["median_s"]["vanilla"] * 1e3] +
                     [r["cpu_ratio_to_vanilla"][k] for k in ("full_f0.0", "full_two_calls", "stop_f0.0",
                                                              "full_unet_only", "stop_unet_only", "text_encode")]
                     for r in sweep["rows"]])
    sd = res.get("sd15_flops")
    if sd:
        md += ["## SD v1.5 step FLOPs (counted on the meta device, no GPU)", ""]
        md += table(["", "vanilla", "stop", "full"],
                    [["TFLOP / image", *(sd["step_flops_per_image"][k] / 1e12 for k in ("vanilla", "stop", "full"))],
                     ["x vanilla", *(sd["flop_ratio_to_vanilla"][k] for k in ("vanilla", "stop", "full"))],
                     [f"images/s at 40% MFU of {sd['peak_tflops']:.0f} TFLOP/s",
                      *(sd["images_per_s_at_40pct_mfu"][k] for k in ("vanilla", "stop", "full"))]])
        md += [(f"UNet {sd['params']['unet'] / 1e6:.1f}M params, forward {sd['unet_fwd_flops_per_image'] / 1e9:.0f} GFLOP/image; "
               f"CLIP text encoder {sd['params']['text_encoder'] / 1e6:.1f}M params, "
               f"{sd['text_encode_flops_per_caption'] / 1e9:.1f} GFLOP per y' caption."), ""]

    pipe = res.get("input_pipeline")
    if pipe:
        st = pipe["stream"]
        md += ["## 3. Input pipeline (benchmarks/bench.yaml: Digits-IT2I L, 32x32, small UNet, batch 8, PoGDiff full, ZeRO-2)", ""]
        rows = [["stream: samples/s to one consumer (iter_batches + collate)", st["samples_per_s"]],
                ["stream: samples/s after the first epoch", st["samples_per_s_after_first_epoch"] or ""],
                ["stream: median seconds to the first batch of an epoch", st["median_first_batch_s"]],
                ["shard bytes per sample", pipe["bytes_per_sample"]]]
        for w, r in sorted(pipe["train"].items()):
            rows += [[f"training, {w} worker(s): samples/s (median of windows after the first)", r["samples_per_s"]],
                     [f"training, {w} worker(s): data_wait_frac (median; first window)",
                      f"{r['data_wait_frac']:.3f} ({r['data_wait_frac_first_window']:.3f})"]]
            hits = r.get("text_cache_hit_rate_windows")
            if hits:
                rows.append([f"training, {w} worker(s): y' caption cache hit rate (cumulative, first / last window)",
                             f"{hits[0]:.2f} / {hits[-1]:.2f}"])
        rows.append(["stream / consumption", pipe["stream_over_consumption"]])
        md += table(["figure", "value"], rows)
    knn = res.get("knn_build")
    if knn:
        md += [(f"## 4. Neighbour index on CPU (d = {knn['rows'][0]['d']}, k = {knn['rows'][0]['k']}, "
               f"threads {knn['threads']}; CPU seconds, wall seconds in brackets)"), ""]

        def both(r, key):
            cpu = r.get("cpu_median_s", {}).get(key)
            return f"{cpu:.1f} ({r['median_s'][key]:.1f})" if cpu is not None else f"({r['median_s'][key]:.1f})"
        md += table(["N", "build_knn", "FAISS alone", "matmul+topk", "build / lower bound", "reps",
                     "query rows timed (bound, FAISS alone)"],
                    [[r["n"], both(r, "build_knn"), both(r, "faiss_search"), both(r, "matmul_topk"),
                      r["build_over_lower_bound"], r["reps"], f"{r['query_rows_timed']:,} (x{r['scaled_by']:.0f})"]
                     for r in knn["rows"]])
    zm = res.get("zero_memory")
    if zm:
        n = zm["rows"][0]["params"]
        md += [f"## 5. Memory per worker, ZeRO stages ({zm['workers']} workers, {n / 1e6:.1f}M-param UNet, fp32 AdamW)", ""]
        md += [("Model: 16 bytes/param at stage 0 (fp32 weights 4 + grads 4 + Adam m,v 8), optimiser states / N at "
               "stage 1, also gradients at 2, also weights at 3; the gradients exist between backward and the "
               "optimiser step, so the model is met at the peak, and after a step (grads freed) the resident set "
               "should be the model less the gradients. Measured per worker above its RSS before the model "
               "was built: weights, fp32 master and Adam states read off the engine; RSS after the steps, after "
               "malloc_trim (freed heap returned to the OS), and at the peak (which also holds transients such as "
               "DeepSpeed's flattening copies and, for ZeRO-3, the full model built before it is partitioned)."), ""]
        md += table(["stage", "model MiB", "model + fp32 master", "weights", "fp32 master", "Adam m,v",
                     "RSS after steps", "RSS after trim", "peak RSS", "bytes/param (trimmed)", "step s"],
                    [[r["stage"], r["model_mib"], r["model_plus_master_mib"], r["weights_mib"], r["master_mib"],
                      r["adam_states_mib"], r["steady_rss_delta_mib"], r.get("trimmed_rss_delta_mib", ""),
                      r["peak_rss_delta_mib"],
                      r.get("measured_bytes_per_param_trimmed", r["measured_bytes_per_param_steady"]),
                      r["median_step_s"]] for r in zm["rows"]])
    sc_ = res.get("scaling")
    if sc_:
        md += ["## 6. Scaling (real run_train, PoGDiff full, ZeRO-2, batch 8 per worker)", ""]
        md += table(["workers", "samples/s", "speed-up", "efficiency", "step s"],
                    [[w, sc_["samples_per_s"][w], sc_["speedup"][w], sc_["efficiency"][w], sc_["step_s"][w]]
                     for w in sorted(sc_["samples_per_s"])])
        md += ["See docs/SCALING.md for the multi-node model.", ""]
    return "\n".join(md)


def render_png(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0, 0]
    sc = res.get("step_cost")
    if sc:
        keys = ["vanilla", "full_f0.0", "full_two_calls", "stop_f0.0", "full_unet_only", "stop_unet_only"]
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [sc["ratio_to_vanilla"][k] for k in keys], 0.4, label="wall")
        ax.bar([i + 0.2 for i in x], [sc["cpu_ratio_to_vanilla"][k] for k in keys], 0.4, label="CPU time")
        ax.axhline(2.0, color="r", ls="--", lw=1, label="full target 2.0")
        ax.axhline(1.4, color="g", ls="--", lw=1, label="stop target 1.40")
        ax.set_xticks(list(x), [k.replace("_f0.0", "") for k in keys], rotation=30, ha="right")
        ax.set_ylabel("step time / vanilla")
        ax.set_title("Step cost (CPU, small UNet, batch 8)")
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        fs = [float(f) for f in sc["extra_cost_rel"]["full"]]
        for mode in ("full", "stop"):
            ax.plot(fs, list(sc["extra_cost_rel"][mode].values()), "o-", label=f"{mode} (wall)")
            ax.plot(fs, list(sc["cpu_extra_cost_rel"][mode].values()), "s--", label=f"{mode} (CPU)")
        ax.plot(fs, [1 - f for f in fs], "k:", label="ideal 1 - f")
        ax.set_xlabel("fraction f of psi = 0 samples")
        ax.set_ylabel("extra cost / extra cost at f = 0")
        ax.set_title("psi = 0 samples skip y'")
        ax.legend(fontsize=7)
    ax = axes[0, 2]
    knn = res.get("knn_build")
    if knn:
        labels = [f"N={r['n'] // 1000}k" for r in knn["rows"]]
        x = range(len(labels))
        for i, (key, lab) in enumerate((("build_knn", "build_knn"), ("faiss_search", "FAISS alone"),
                                        ("matmul_topk", "matmul+topk bound"))):
            ax.bar([j + (i - 1) * 0.27 for j in x], [r.get("cpu_median_s", r["median_s"])[key] for r in knn["rows"]],
                   0.27, label=lab)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("CPU seconds (1 thread)" if "cpu_median_s" in knn["rows"][0] else "seconds")
        ax.set_title("k-NN build (d=384, k=20)")
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    zm = res.get("zero_memory")
    if zm:
        stages = [r["stage"] for r in zm["rows"]]
        x = range(len(stages))
        bars = [("model_mib", "model (16 B/param, by stage)"), ("model_plus_master_mib", "+ fp32 master"),
                ("steady_rss_delta_mib", "RSS after steps"), ("trimmed_rss_delta_mib", "RSS after trim"),
                ("peak_rss_delta_mib", "peak RSS")]
        bars = [b for b in bars if b[0] in zm["rows"][0]]
        w = 0.8 / len(bars)
        for i, (key, lab) in enumerate(bars):
            ax.bar([j + (i - (len(bars) - 1) / 2) * w for j in x], [r[key] for r in zm["rows"]], w, label=lab)
        ax.set_xticks(list(x), [f"ZeRO-{s}" for s in stages])
        ax.set_ylabel("MiB per worker (above baseline)")
        ax.set_title(f"Memory, {zm['workers']} workers, {zm['rows'][0]['params'] / 1e6:.0f}M params")
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    pipe = res.get("input_pipeline")
    if pipe:
        vals = {"stream": pipe["stream"]["samples_per_s"]}
        vals.update({f"train {w}w": r["samples_per_s"] for w, r in sorted(pipe["train"].items())})
        ax.bar(list(vals), list(vals.values()), color=["C0"] + ["C1"] * (len(vals) - 1))
        ax.axhline(3 * pipe["consumption_samples_per_s"], color="r", ls="--", lw=1, label="3x consumption")
        ax.set_yscale("log")
        ax.set_ylabel("samples/s")
        ax.set_title("Input pipeline vs training consumption")
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    sc_ = res.get("scaling")
    if sc_:
        ws = sorted(sc_["samples_per_s"], key=int)
        ax.plot([int(w) for w in ws], [sc_["samples_per_s"][w] for w in ws], "o-", label="measured")
        one = sc_["samples_per_s"][ws[0]]
        ax.plot([int(w) for w in ws], [one * int(w) / int(ws[0]) for w in ws], "k:", label="linear")
        ax.set_xlabel("Ray Train workers")
        ax.set_ylabel("samples/s")
        ax.set_title("Scaling on 2 cores (ZeRO-2)")
        ax.legend(fontsize=7)
    fig.suptitle("pogdiff_dist CPU benchmarks (shared 2-core machine; medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    names = ("run_all", "step_cost", "step_cost_sweep", "sd15_flops", "input_pipeline", "knn_build", "zero_memory",
             "scaling")
    res = {n: r for n in names if (r := load(n)) is not None}
    (RESULTS / "summary.md").write_text(render_md(res))
    render_png(res, RESULTS / "summary.png")
    print(f"wrote {RESULTS / 'summary.md'} and {RESULTS / 'summary.png'}")


if __name__ == "__main__":
    main()
