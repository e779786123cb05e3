"""Where y' (the neighbour caption's states) comes from for multi-encoder families: re-encoded on
the training worker (with the per-caption cache), or stored at prepare time and looked up.

Measures, on the tiny random SDXL / SD3 / Flux models (pogdiff_dist/families/tiny.py), the time
to encode a micro-batch of y' on this machine's CPU and to read the same states back from a
memory-mapped table, and computes the full-size costs from the published encoder sizes: disk
per caption, disk for 100k samples stored once per caption and once per stored neighbour, and
the encoder FLOPs and memory a worker pays to re-encode.

    python benchmarks/neighbour_states.py --out benchmarks/results/neighbour_states.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(BENCH), str(BENCH.parent)) if p not in sys.path]

import numpy as np
import torch

# Published sizes (parameters; hidden width; tokens) of the full-size encoders and states
FULL = {
    "sdxl": {"encoders": {"CLIP-L": 123e6, "OpenCLIP-G": 695e6}, "state_tokens": 77, "state_width": 2048,
             "pooled": 1280},
    "sd3": {"encoders": {"CLIP-L": 123e6, "CLIP-G": 695e6, "T5-XXL": 4.76e9}, "state_tokens": 77 + 256,
            "state_width": 4096, "pooled": 2048, "t5_tokens": 256},
    "flux": {"encoders": {"CLIP-L": 123e6, "T5-XXL": 4.76e9}, "state_tokens": 512, "state_width": 4096,
             "pooled": 768, "t5_tokens": 512},
}
SAMPLES, NEIGHBOURS, BATCH = 100_000, 20, 4


def full_size(name: str) -> dict:
    f = FULL[name]
    per_caption = (f["state_tokens"] * f["state_width"] + f["pooled"]) * 2  # fp16
    # encoder forward FLOPs for one caption: 2 x params x tokens (CLIPs at 77 tokens, T5 at its limit)
    flops = sum(2 * p * (f.get("t5_tokens", 77) if "T5" in enc else 77) for enc, p in f["encoders"].items())
    return {"bytes_per_caption": per_caption, "stored_once_per_sample_gb": per_caption * SAMPLES / 1e9,
            "stored_per_neighbour_gb": per_caption * SAMPLES * NEIGHBOURS / 1e9,
            "reencode_tflop_per_caption": flops / 1e12, "encoder_bf16_gb_per_worker": 2 * sum(f["encoders"].values()) / 1e9}


def tiny_measure(name: str, work: Path, reps: int) -> dict:
    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.families.tiny import build_tiny
    from pogdiff_dist.models import load_text_encoder

    family = get_family(name)
    root = build_tiny(name, work / name)
    text = load_text_encoder(root, root, 16)
    captions = [f"An image of Person {c}, facing left." for c in "ABCDEFGH"][:BATCH]
    ids, lengths = text.tokenize(captions)
    ids_t, lengths_t = torch.from_numpy(ids).long(), torch.from_numpy(lengths).long()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        hidden, pooled = text.encode_ids(ids_t, lengths_t)
        times.append(time.perf_counter() - t0)
    table = np.lib.format.open_memmap(str(work / f"{name}.npy"), mode="w+", dtype=np.float16,
                                      shape=(SAMPLES // 100, *hidden.shape[1:]))
    rows = np.random.default_rng(0).integers(0, len(table), size=(reps, BATCH))
    reads = []
    for r in rows:
        t0 = time.perf_counter()
        torch.from_numpy(np.ascontiguousarray(table[np.sort(r)])).float()
        reads.append(time.perf_counter() - t0)
    return {"family": family.name, "encoders": [e.model_class for e in family.encoders],
            "reencode_ms_per_microbatch": 1e3 * statistics.median(times),
            "table_read_ms_per_microbatch": 1e3 * statistics.median(reads),
            "state_shape": list(hidden.shape[1:]), "pooled_dim": None if pooled is None else pooled.shape[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(BENCH / "results" / "neighbour_states.json"))
    args = p.parse_args()
    from _common import write_result

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = {name: tiny_measure(name, Path(tmp), args.reps) for name in FULL}
    result = {"batch": BATCH, "samples": SAMPLES, "neighbours_stored": NEIGHBOURS, "tiny_cpu_1_thread": tiny,
              "full_size": {name: full_size(name) for name in FULL}}
    write_result("neighbour_states", result, args.out)
    for name in FULL:
        t, f = tiny[name], result["full_size"][name]
        print(f"{name}: tiny re-encode {t['reencode_ms_per_microbatch']:.1f} ms vs table read "
              f"{t['table_read_ms_per_microbatch']:.2f} ms per micro-batch of {BATCH}; full size "
              f"{f['bytes_per_caption'] / 2**20:.2f} MiB per caption, {f['stored_once_per_sample_gb']:.0f} GB stored "
              f"once for 100k, {f['stored_per_neighbour_gb'] / 1e3:.1f} TB per stored neighbour (k=20), re-encode "
              f"{f['reencode_tflop_per_caption']:.2f} TFLOP per caption, encoders {f['encoder_bf16_gb_per_worker']:.1f} "
              f"GB bf16 per worker")


if __name__ == "__main__":
    main()
