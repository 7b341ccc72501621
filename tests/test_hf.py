"""The key map, strict loading, and saving in the official layout."""
import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phi3v import Phi3V, Phi3VConfig
from phi3v.hf import is_unused, to_hf, to_ours, unused_shapes


def hf_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_key_map_covers_real_checkpoint(golden_dir):
    """Every key of the official 592-tensor index maps to our model or is a listed unused extra."""
    index = json.loads((golden_dir / "real-layout" / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(keys) == 592
    cfg = Phi3VConfig()                                          # the real sizes
    with torch.device("meta"):
        model = Phi3V(cfg)
    ours = set(model.state_dict())
    used = {k for k in keys if not is_unused(cfg, k)}
    assert {to_ours(k) for k in used} == ours                  # bijection on the used keys
    assert {to_hf(k) for k in ours} == used
    assert keys - used == set(unused_shapes(cfg))               # layer 23 + post_layernorm
    assert sum(p.numel() for p in model.parameters()) + sum(
        torch.Size(s).numel() for s in unused_shapes(cfg).values()) == 4_146_621_440


def test_unknown_key_raises():
    with pytest.raises(KeyError, match="not part of Phi-3.5-vision"):
        to_ours("transformer.h.0.attn.weight")


def test_round_trip_every_key(tiny_ckpt, tmp_path):
    model = Phi3V.from_pretrained(tiny_ckpt)
    model.save_pretrained(tmp_path / "out")
    orig, saved = hf_keys(tiny_ckpt / "model.safetensors"), hf_keys(tmp_path / "out" / "model.safetensors")
    assert set(orig) == set(saved)
    for k in orig:
        assert torch.equal(orig[k], saved[k]), k
    again = Phi3V.from_pretrained(tmp_path / "out")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = Phi3VConfig.from_json(tmp_path / "out"), Phi3VConfig.from_json(tiny_ckpt)
    assert dataclasses.replace(a, name_or_path="") == dataclasses.replace(b, name_or_path="")


def test_sharded_save_and_load(tiny_ckpt, tmp_path):
    model = Phi3V.from_pretrained(tiny_ckpt)
    model.save_pretrained(tmp_path, max_shard_size=4_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(hf_keys(tiny_ckpt / "model.safetensors"))
    again = Phi3V.from_pretrained(tmp_path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # a later single-file save removes the stale shards
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("model-*"))


def test_load_dtype(tiny_ckpt):
    m = Phi3V.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(t.dtype == torch.bfloat16 for t in m.hf_extras.values())


def copy_ckpt(tiny_ckpt, dst):
    shutil.copytree(tiny_ckpt, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def rewrite(dst, fn):
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"), "missing 1 tensor.*model.layers.1.mlp.down_proj"),
    (lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)), "unexpected.*model.layers.0.extra"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(65)), "model.norm.weight.*shape"),
    (lambda sd: sd.__setitem__("foo.bar", torch.zeros(2)), "foo.bar"),
])
def test_strict_loading(tiny_ckpt, tmp_path, change, message):
    dst = copy_ckpt(tiny_ckpt, tmp_path / "c")
    rewrite(dst, change)
    with pytest.raises((ValueError, KeyError), match=message):
        Phi3V.from_pretrained(dst)


def test_truncated_and_corrupt_safetensors(tiny_ckpt, tmp_path):
    dst = copy_ckpt(tiny_ckpt, tmp_path / "c")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*(corrupted or truncated)"):
        Phi3V.from_pretrained(dst)
    (dst / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read safetensors"):
        Phi3V.from_pretrained(dst)


def test_missing_files(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a hub id"):
        Phi3V.from_pretrained(tmp_path / "nope" / "deeper")
    dst = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Phi3V.from_pretrained(dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="x.safetensors"):
        Phi3V.from_pretrained(dst)


@pytest.mark.parametrize("change, key, expect", [
    (lambda sd: sd.__setitem__("foo.bar", torch.zeros(2)), "foo.bar", "no rule in the key map"),
    (lambda sd: sd.__setitem__("transformer.h.0.attn.weight", torch.zeros(2)), "transformer.h.0.attn.weight",
     "no rule in the key map"),
    (lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].to(torch.int32)), "model.norm.weight",
     "dtype int32, expected a floating-point weight"),
    (lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"] > 0), "lm_head.weight", "dtype bool"),
])
def test_bad_tensor_names_file_key_and_expectation(tiny_ckpt, tmp_path, change, key, expect):
    """A key the key map does not know, or an integer/bool tensor where a float weight belongs: a
    ValueError naming the safetensors file, the key and what was expected (not a KeyError or a cast)."""
    dst = copy_ckpt(tiny_ckpt, tmp_path / "c")
    rewrite(dst, change)
    with pytest.raises(ValueError) as e:
        Phi3V.from_pretrained(dst)
    assert e.type is ValueError and str(dst / "model.safetensors") in str(e.value), str(e.value)
    assert repr(key) in str(e.value) and expect in str(e.value), str(e.value)


def test_bad_tensor_in_a_shard_names_the_shard(tiny_ckpt, tmp_path):
    Phi3V.from_pretrained(tiny_ckpt).save_pretrained(tmp_path, max_shard_size=4_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"]["model.norm.weight"]
    sd = load_file(str(shard))
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int64)
    save_file(sd, str(shard))
    with pytest.raises(ValueError, match=f"^{re.escape(str(shard))}: tensor 'model.norm.weight' has dtype int64"):
        Phi3V.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, "bfloat16", None])
def test_load_dtype_must_be_a_float_dtype(tiny_ckpt, dtype):
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        Phi3V.from_pretrained(tiny_ckpt, dtype=dtype)


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE and an id that is not in the cache: the model and the processor both say which
    id, and to download it first or point --model at a directory (not huggingface_hub's own text)."""
    from huggingface_hub import constants

    from phi3v import Processor
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for load in (Phi3V.from_pretrained, Processor.from_pretrained):
        with pytest.raises(FileNotFoundError) as e:
            load("someone/not-cached-model")
        msg = str(e.value)
        assert "'someone/not-cached-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in msg
        assert "download it first (`hf download someone/not-cached-model`" in msg and "--model" in msg, msg
