from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model.testing import make_adapter
from rolevec.vectors.role_vectors import RoleVectors


def _vectors(n_layers: int = 3, hidden: int = 32) -> RoleVectors:
    torch.manual_seed(0)
    shape = (4, n_layers + 1, hidden)
    return RoleVectors(
        role_means={"mathematician": torch.randn(shape), "doctor": torch.randn(shape)},
        base_mean=torch.randn(shape),
        positions=(-4, -3, -2, -1),
        position_tokens=("<|im_end|>", "\n", "<|im_start|>", "\n"),
        metadata={"model": "tiny-llama", "model_fingerprint": make_adapter("llama").fingerprint()},
    )


def test_roundtrip_is_exact(tmp_path: Path) -> None:
    vecs = _vectors()
    path = vecs.save(tmp_path / "v.safetensors")
    loaded = RoleVectors.load(path)
    assert vecs.roles == ("mathematician", "doctor") and loaded.roles == vecs.roles  # order kept
    assert loaded.positions == vecs.positions and loaded.position_tokens == vecs.position_tokens
    for role in vecs.roles:
        assert torch.equal(loaded.diff(role), vecs.diff(role))
    v = loaded.vector("doctor", 2, -1)
    assert torch.equal(v, vecs.role_means["doctor"][3, 2] - vecs.base_mean[3, 2])
    assert loaded.metadata == vecs.metadata  # the stored role order is not left in the metadata


def test_file_is_plain_safetensors_with_json_header(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _vectors().save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["rolevec"])
        assert "diff/doctor" in f.keys()
    assert header["format"] == "rolevec.vectors/1" and "input of decoder block" in header["layer_convention"]


def test_refuses_overwrite_and_leaves_nothing_partial(tmp_path: Path) -> None:
    out = tmp_path / "v.safetensors"
    _vectors().save(out)
    with pytest.raises(RolevecError, match="`force=True`"):
        _vectors().save(out)
    _vectors().save(out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_bad_lookups(tmp_path: Path) -> None:
    vecs = _vectors()
    with pytest.raises(RolevecError, match="lawyer"):
        vecs.vector("lawyer", 1, -1)
    with pytest.raises(RolevecError, match="layer 9"):
        vecs.vector("doctor", 9, -1)
    with pytest.raises(RolevecError, match="position -7"):
        vecs.vector("doctor", 1, -7)
    with pytest.raises(RolevecError, match="does not exist"):
        RoleVectors.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(RolevecError, match="not a readable"):
        RoleVectors.load(junk)
    # readable safetensors, but no positions in the header, or a base mean of the wrong rank
    from safetensors.torch import save_file

    header = {"rolevec": json.dumps({"format": "rolevec.vectors/1"})}
    save_file({"mean/__base__": torch.zeros(2, 3, 4)}, str(junk), metadata=header)
    with pytest.raises(RolevecError, match="lacks valid positions"):
        RoleVectors.load(junk)
    header = {
        "rolevec": json.dumps({"format": "rolevec.vectors/1", "positions": [-1], "position_tokens": ["a"]})
    }
    save_file({"mean/__base__": torch.zeros(3, 4)}, str(junk), metadata=header)
    with pytest.raises(RolevecError, match="not a usable rolevec vector file: base mean has shape"):
        RoleVectors.load(junk)


def test_compatibility_checks() -> None:
    vecs = _vectors()
    vecs.check_compatible(make_adapter("llama"))
    with pytest.warns(UserWarning, match="fingerprint"):
        vecs.check_compatible(make_adapter("qwen2"))
    with pytest.raises(RolevecError, match="hidden size"):
        _vectors(hidden=16).check_compatible(make_adapter("llama"))


@pytest.mark.parametrize(("tensor", "bad"), [("doctor", math.nan), ("__base__", math.inf)])
def test_non_finite_values_name_file_tensor_and_site(tmp_path: Path, tensor: str, bad: float) -> None:
    """A NaN in a vector file used to load silently and turn every steered activation into NaN."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _vectors().save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[f"mean/{tensor}"][2, 1, 5] = bad  # position -2, layer 1
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(RolevecError) as info:
        RoleVectors.load(path)
    assert str(info.value) == (
        f"{path} holds non-finite values (NaN or inf) in tensor mean/{tensor} (first at position -2, "
        "layer 1): re-extract it with `rolevec extract`"
    )
