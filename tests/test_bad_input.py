"""Bad training shards: every problem is an error naming shard, sample and field, or a
counted skip with ``data.on_bad=skip``. Nothing from a shard is ever unpickled.

The streamed batch is built exactly as Ray Data builds it (``decode_sample`` per sample,
then columns), so these run in milliseconds without a cluster; the integration tests run
the same decoder inside the real stream.
"""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from pogdiff_dist.data.shard_files import file_digest, verify_shards
from pogdiff_dist.data.shards import ARRAY_FIELDS, Manifest, collate, decode_sample

FP = "f" * 16


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sample(i: int, fingerprint: str = FP) -> dict[str, bytes]:
    rng = np.random.default_rng(i)
    arrays = {
        "latent.npy": rng.standard_normal((1, 4, 4)).astype(np.float32),
        "y.npy": rng.standard_normal((3, 8)).astype(np.float16),
        "nbr_tokens.npy": rng.integers(0, 100, (2, 3)).astype(np.int32),
        "nbr_len.npy": np.array([3, 2], np.int32),
        "nbr_index.npy": np.array([(i + 1) % 4, (i + 2) % 4], np.int64),
        "nbr_sim.npy": np.array([0.9, 0.5], np.float32),
        "nbr_same.npy": np.array([1, 0], np.uint8),
    }
    raw = {"__key__": f"s{i:03d}", "__url__": "/data/shards/000.tar"}
    raw.update({k: _npy(v) for k, v in arrays.items()})
    raw["meta.json"] = json.dumps({"index": i, "identity_id": i % 2, "caption": f"c{i}", "elbo": 10.0 + i,
                                   "fingerprint": fingerprint}).encode()
    return raw


def _stream(raws: list[dict]) -> dict[str, np.ndarray]:
    """Columns of decoded samples, as ``iter_batches(batch_format="numpy")`` yields them."""
    from pogdiff_dist.data.shards import rows_to_columns

    return rows_to_columns([decode_sample(r) for r in raws])


def test_good_batch_collates():
    batch = collate(_stream([_sample(i) for i in range(4)]), fingerprint=FP)
    assert batch.index.tolist() == [0, 1, 2, 3] and batch.identity.tolist() == [0, 1, 0, 1]
    assert batch.x0.shape == (4, 1, 4, 4) and batch.nbr_tokens.shape == (4, 2, 3)


def _bad(kind: str) -> dict:
    raw = _sample(2)
    if kind == "missing":
        del raw["y.npy"]
    elif kind == "nan_latent":
        a = np.zeros((1, 4, 4), np.float32)
        a[0, 1, 2] = np.nan
        raw["latent.npy"] = _npy(a)
    elif kind == "inf_embedding":
        raw["y.npy"] = _npy(np.full((3, 8), np.inf, np.float16))
    elif kind == "garbage_npy":
        raw["nbr_sim.npy"] = b"not an array"
    elif kind == "bad_meta":
        raw["meta.json"] = b"{truncated"
    elif kind == "foreign":
        raw = _sample(2, fingerprint="0" * 16)
    return raw


@pytest.mark.parametrize("kind, named", [
    ("missing", "missing field y.npy"),
    ("nan_latent", "field latent.npy holds NaN or Inf"),
    ("inf_embedding", "field y.npy holds NaN or Inf"),
    ("garbage_npy", "field nbr_sim.npy is not a readable .npy"),
    ("bad_meta", "meta.json is not valid JSON"),
    ("foreign", "written by another prepare run"),
])
def test_bad_sample_raises_naming_shard_sample_field_or_is_skipped(kind, named):
    raws = [_sample(0), _sample(1), _bad(kind), _sample(3)]
    with pytest.raises(ValueError) as err:
        collate(_stream(raws), fingerprint=FP)
    msg = str(err.value)
    assert "/data/shards/000.tar" in msg and "sample s002" in msg and named in msg
    assert "data.on_bad=skip" in msg  # says how to skip instead

    skipped: list[str] = []
    batch = collate(_stream(raws), on_bad="skip", skipped=skipped, fingerprint=FP)
    assert batch.index.tolist() == [0, 1, 3]  # exactly the bad one dropped, order kept
    assert len(skipped) == 1 and "sample s002" in skipped[0] and named in skipped[0]


def test_all_bad_batch_returns_none_and_counts_each():
    skipped: list[str] = []
    assert collate(_stream([_bad("nan_latent"), _bad("missing")]), on_bad="skip", skipped=skipped) is None
    assert len(skipped) == 2


class _Boom:
    def __reduce__(self):  # unpickling this would run code
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickles_are_never_deserialised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _sample(0)
    raw["evil.pickle"] = pickle.dumps(_Boom())
    raw["latent.npy"] = _npy(np.array([_Boom()], dtype=object))  # a pickle hidden in an object .npy
    skipped: list[str] = []
    assert collate(_stream([raw]), on_bad="skip", skipped=skipped) is None
    assert not (tmp_path / "PWNED").exists()
    assert "unexpected member(s) ['evil.pickle']" in skipped[0]
    assert "latent.npy is not a readable .npy" in skipped[0]


def _write_shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _manifest(tmp_path, names, checksums=True) -> Manifest:
    return Manifest(fingerprint=FP, num_samples=2, k_max=2, latent_shape=[1, 4, 4], text_shape=[3, 8],
                    identities=["a", "b"], train_counts=[1, 1], shards=names, text_encoder_dir="", tokenizer_dir="",
                    vae_dir=None,
                    shard_bytes={n: (tmp_path / n).stat().st_size for n in names},
                    shard_sha256={n: file_digest(tmp_path / n) for n in names} if checksums else {})


def _members(i):
    raw = _sample(i)
    return {f"{raw['__key__']}.{k}": v for k, v in raw.items() if not k.startswith("__")}


def test_verify_shards_truncated_corrupt_missing_and_escaping(tmp_path):
    _write_shard(tmp_path / "000.tar", _members(0))
    _write_shard(tmp_path / "001.tar", _members(1))
    manifest = _manifest(tmp_path, ["000.tar", "001.tar"])
    verify_shards(tmp_path, manifest)  # intact

    data = (tmp_path / "001.tar").read_bytes()
    (tmp_path / "001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"001\.tar is \d+ bytes but prepare wrote \d+: truncated"):
        verify_shards(tmp_path, manifest, checksum=False)  # the size check runs even without checksums

    corrupt = bytearray(data)
    corrupt[600] ^= 0xFF
    (tmp_path / "001.tar").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"001\.tar does not match the checksum"):
        verify_shards(tmp_path, manifest)

    (tmp_path / "001.tar").unlink()
    with pytest.raises(ValueError, match=r"001\.tar listed in the manifest is missing"):
        verify_shards(tmp_path, manifest)

    # no recorded checksum (older manifest): the tar structure is still checked
    (tmp_path / "002.tar").write_bytes(b"\0garbage" * 200)
    with pytest.raises(ValueError, match=r"002\.tar is not a readable tar file"):
        verify_shards(tmp_path, _manifest(tmp_path, ["002.tar"], checksums=False))
    _write_shard(tmp_path / "003.tar", {"../../etc/s000.latent.npy": b"x", **_members(0)})
    with pytest.raises(ValueError, match=r"member '\.\./\.\./etc/s000\.latent\.npy' is not a plain relative file"):
        verify_shards(tmp_path, _manifest(tmp_path, ["003.tar"], checksums=False))


def test_every_field_is_checked():
    """A sample missing any one field is caught, whichever it is."""
    for field in (*ARRAY_FIELDS, "meta.json"):
        raw = _sample(0)
        del raw[field]
        with pytest.raises(ValueError, match=f"missing field {field}"):
            collate(_stream([raw]))


def test_encoder_producing_nan_names_the_images(tmp_path):
    """A VAE that emits NaN (e.g. fp16 overflow) is stopped at prepare, naming the images."""
    import torch
    from conftest import make_tiny_sd
    from diffusers import AutoencoderKL
    from PIL import Image

    from pogdiff_dist.data.encode import SampleEncoder

    sd = make_tiny_sd(tmp_path / "sd")
    vae = AutoencoderKL.from_pretrained(str(sd / "vae"))
    with torch.no_grad():
        vae.encoder.conv_in.bias.fill_(float("nan"))
    vae.save_pretrained(str(sd / "vae"))
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(paths[-1])
    enc = SampleEncoder(str(sd / "text_encoder"), str(sd / "tokenizer"), 8, 16, 3, vae_dir=str(sd / "vae"))
    batch = {"index": np.arange(2), "key": np.array(["a", "b"]), "identity_id": np.zeros(2, np.int64),
             "caption": np.array(["x", "y"]), "image": np.array(paths)}
    with pytest.raises(ValueError, match=r"NaN/Inf in 'latent' for image\(s\) \[.*img0\.png.*img1\.png"):
        enc(batch)
