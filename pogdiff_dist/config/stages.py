"""Which config keys each prepare stage reads: the line between prepare time and train time.

Prepare runs four stages (encode -> neighbours, density -> shards); each leaves a marker
with a fingerprint, and a stage whose fingerprint matches is not redone. A stage's
fingerprint hashes exactly the values its output depends on (:func:`stage_reads`) and the
fingerprints of the stages it reads from, so changing a train-time key (the denoiser's
initialisation, LoRA, the prediction type, the objective, the optimiser, the sampling
plan...) reruns no prepare stage, and changing a prepare-time key reruns that stage and
those downstream of it.

Some prepare keys say how a stage runs, not what it makes (:data:`PREPARE_EXECUTION`):
where the outputs go, how many encoder actors and GPUs, the encoder batch size, how many
queries measure the IVF recall. They are in no fingerprint.
"""

from __future__ import annotations

from typing import Any

PREPARE_STAGES = ("encode", "neighbours", "density", "shards")
UPSTREAM = {"encode": (), "neighbours": ("encode",), "density": ("encode",), "shards": ("neighbours", "density")}

# every key some stage's output may depend on (stage_reads picks those that apply to a config)
PREPARE_OUTPUT_KEYS = (
    "data.dataset", "data.resolution", "data.channels", "data.heldout_per_identity", "data.seed",
    "model.pretrained", "model.text_encoder", "model.image_encoder", "model.max_length",
    "prepare.k_max", "prepare.knn_index", "prepare.knn_nlist", "prepare.knn_nprobe", "prepare.knn_train_rows",
    "prepare.density_latent_dim", "prepare.density_hidden_dim", "prepare.density_epochs", "prepare.density_lr",
    "prepare.density_text", "prepare.density_buffer_rows", "prepare.samples_per_shard",
)
# read by prepare, but only to decide where and how it runs
PREPARE_EXECUTION = ("prepare.out_dir", "prepare.batch_size", "prepare.num_encoders", "prepare.gpus_per_encoder",
                     "prepare.knn_recall_queries", "data.on_bad")
PREPARE_KEYS = PREPARE_OUTPUT_KEYS + PREPARE_EXECUTION


def stage_reads(cfg) -> dict[str, dict[str, Any]]:
    """stage -> {key: value} of the config values its output depends on, for this config.

    - encode: the images and captions (the records' own fingerprint, outside the config),
      the resolution, the pixel channels (without a VAE), the bundled dataset's build
      (preset, seed, held-out split), the text encoder and VAE (``model.pretrained``, else
      ``model.text_encoder``), the image encoder and the token length;
    - neighbours: k_max and the index (with IVF: its lists, probes, training rows and seed);
    - density: the text VAE's settings, what it models and its seed;
    - shards: the shard size.
    """
    d, m, p = cfg.data, cfg.model, cfg.prepare
    encode: dict[str, Any] = {"data.dataset": d.dataset, "data.resolution": d.resolution,
                              "model.image_encoder": m.image_encoder, "model.max_length": m.max_length}
    if m.pretrained is None:
        encode.update({"data.channels": d.channels, "model.text_encoder": m.text_encoder})
    else:
        encode["model.pretrained"] = m.pretrained
    if d.bundled is not None:
        encode.update({"data.seed": d.seed, "data.heldout_per_identity": d.heldout_per_identity})
    neighbours: dict[str, Any] = {"prepare.k_max": p.k_max, "prepare.knn_index": p.knn_index}
    if p.knn_index == "ivf":
        neighbours.update({"prepare.knn_nlist": p.knn_nlist, "prepare.knn_nprobe": p.knn_nprobe,
                           "prepare.knn_train_rows": p.knn_train_rows, "data.seed": d.seed})
    density = {"prepare.density_latent_dim": p.density_latent_dim, "prepare.density_hidden_dim": p.density_hidden_dim,
               "prepare.density_epochs": p.density_epochs, "prepare.density_lr": p.density_lr,
               "prepare.density_text": p.density_text, "prepare.density_buffer_rows": p.density_buffer_rows,
               "data.seed": d.seed}
    shards = {"prepare.samples_per_shard": p.samples_per_shard}
    return {"encode": encode, "neighbours": neighbours, "density": density, "shards": shards}


def is_train_time(key: str) -> bool:
    """A key no prepare stage reads: changing it never re-prepares the data."""
    return key not in PREPARE_KEYS
