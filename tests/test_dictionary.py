import json
import struct

import numpy as np
import pytest
import torch
from reference_impls import random_unit
from safetensors.torch import save_file

from itda.dictionary import Dictionary, DictionaryMeta, cosine_to_threshold, threshold_to_cosine
from itda.errors import ItdaInputError


def _dict(n=20, d=8, dtype=torch.float32) -> Dictionary:
    atoms = torch.from_numpy(random_unit(n, d, np.random.default_rng(0))).to(dtype)
    refs = torch.arange(n * 5, dtype=torch.int64).view(n, 5)
    return Dictionary(atoms, refs, DictionaryMeta(d=d, k=4, model="m", layer=3, threshold=1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip(tmp_path, dtype):
    d = _dict(dtype=dtype)
    d.save(tmp_path / "d.safetensors")
    e = Dictionary.load(tmp_path / "d.safetensors")
    assert torch.equal(d.atoms, e.atoms) and e.atoms.dtype == dtype
    assert torch.equal(d.refs, e.refs)
    assert e.meta == d.meta


def test_threshold_cosine_conversion():
    # the paper's GPT-2 small setting: 0.0004 at d=768 is cosine 0.8464
    assert threshold_to_cosine(0.0004, 768) == pytest.approx(0.8464)
    assert cosine_to_threshold(threshold_to_cosine(0.0004, 768), 768) == pytest.approx(0.0004)


def test_encode_decode_reconstruct():
    d = _dict(n=64, d=16)
    x = torch.randn(10, 16)
    codes = d.encode(x, 6)
    assert codes.indices.shape == (10, 6)
    torch.testing.assert_close(d.decode(codes), d.reconstruct(x, 6))
    r = x - d.decode(codes)
    torch.testing.assert_close((r * r).sum(1), codes.residual_sq, rtol=1e-4, atol=1e-4)


def test_missing_file(tmp_path):
    with pytest.raises(ItdaInputError, match="no such dictionary"):
        Dictionary.load(tmp_path / "nope.safetensors")


def test_truncated_file_rejected(tmp_path):
    p = tmp_path / "d.safetensors"
    _dict().save(p)
    p.write_bytes(p.read_bytes()[:-37])
    with pytest.raises(ItdaInputError, match=str(p.name)):
        Dictionary.load(p)


def test_garbage_file_rejected(tmp_path):
    p = tmp_path / "d.safetensors"
    p.write_bytes(b"\x00" * 3 + b"not a dictionary at all")
    with pytest.raises(ItdaInputError, match="not a readable safetensors"):
        Dictionary.load(p)


def _rewrite_meta(src, dst, **changes):
    d = Dictionary.load(src)
    meta = json.loads(d.meta.to_json())
    meta.update(changes)
    save_file({"atoms": d.atoms, "refs": d.refs}, str(dst), metadata={"itda": json.dumps(meta)})


def test_wrong_version_rejected(tmp_path):
    _dict().save(tmp_path / "a.safetensors")
    _rewrite_meta(tmp_path / "a.safetensors", tmp_path / "b.safetensors", format_version=99)
    with pytest.raises(ItdaInputError, match="format version 99"):
        Dictionary.load(tmp_path / "b.safetensors")


def test_wrong_d_rejected(tmp_path):
    _dict().save(tmp_path / "a.safetensors")
    _rewrite_meta(tmp_path / "a.safetensors", tmp_path / "b.safetensors", d=9)
    with pytest.raises(ItdaInputError, match="d=8 but metadata says d=9"):
        Dictionary.load(tmp_path / "b.safetensors")


@pytest.mark.parametrize(
    "atoms,match",
    [
        (torch.full((3, 8), float("nan")), "NaN"),
        (torch.ones(3, 8), "not unit-norm"),
    ],
)
def test_bad_atoms_rejected(tmp_path, atoms, match):
    meta = DictionaryMeta(d=8)
    p = tmp_path / "bad.safetensors"
    save_file({"atoms": atoms, "refs": torch.full((3, 5), -1)}, str(p), metadata={"itda": meta.to_json()})
    with pytest.raises(ItdaInputError, match=match):
        Dictionary.load(p)


def test_not_an_itda_file(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"atoms": torch.eye(3)}, str(p))
    with pytest.raises(ItdaInputError, match="not an itda dictionary"):
        Dictionary.load(p)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "d.safetensors"
    _dict().save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("itda.tensorfile.save_file", boom)
    with pytest.raises(OSError):
        _dict(n=5).save(p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["d.safetensors"]


def test_header_is_json_metadata(tmp_path):
    p = tmp_path / "d.safetensors"
    _dict().save(p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["itda"])
    assert meta["model"] == "m" and meta["format_version"] == 1
