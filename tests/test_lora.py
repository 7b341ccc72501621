"""LoRA: the peft golden adapter, peft interoperability both ways, init/merge/freeze, bad adapters."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from phi3v import Phi3V, Phi3VConfig
from phi3v.config import CLIP_LINEARS, LM_LINEARS, PROJECTOR_LINEARS
from phi3v.hf import to_hf
from phi3v.lora import (LoRALinear, apply_lora, load_adapter, lora_parameters, lora_state_dict, merge_lora,
                        save_adapter)

from hf_reference import transformers_phi3

LM = list(LM_LINEARS)
VISION = list(CLIP_LINEARS + PROJECTOR_LINEARS)


@pytest.fixture(scope="module")
def cases(golden_dir):
    return {c["name"]: c for c in json.loads((golden_dir / "cases" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def adapter_dir(golden_dir):
    return golden_dir / "cases" / "lora" / "adapter"


def inputs(golden_dir, case):
    z = np.load(golden_dir / "cases" / case["inputs_from"])
    return {k: torch.from_numpy(z[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes",
                                                 "labels") if k in z.files}


def check(out, golden_dir, case, cases):
    """The maintainers' rule, with the tolerance of the model case the inputs come from."""
    z = {k: torch.from_numpy(v) for k, v in np.load(golden_dir / "cases" / case["file"]).items()}
    model_case = next(c for c in cases.values() if c.get("file") == case["inputs_from"])
    tol = model_case["recommended_tolerance"]
    keep = inputs(golden_dir, case)["attention_mask"].bool()
    dh = (out.hidden_states - z["last_hidden_state"])[keep].abs().max().item()
    assert dh <= max(1e-4, tol["last_hidden_state_atol"]), f"{case['name']}: hidden max|d| {dh:.3g}"
    dl = (out.logits[:, -4:] - z["logits_last4"]).abs().max().item()
    assert dl <= max(1e-3, tol["logits_atol"]), f"{case['name']}: logits max|d| {dl:.3g}"
    sure = keep & (z["logits_top2_margin"] > 1e-3)
    assert torch.equal(out.logits.argmax(-1)[sure], z["logits_argmax"][sure])
    assert abs(out.loss.item() - z["loss"].item()) <= max(1e-4, tol["loss_atol"])


def tiny_model(**kw):
    return Phi3V.from_config(Phi3VConfig.tiny(vocab_size=300, pad_token_id=299, **kw), seed=3).eval()


def randomize_b(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------------
# golden: an adapter peft 0.13.2 saved for tiny-phi3v, and the reference outputs with it
@pytest.mark.parametrize("name", ["mf_text_short", "mf_one_image"])
def test_golden_adapter_forward_and_merge(tiny_ckpt, golden_dir, adapter_dir, cases, name):
    model = load_adapter(Phi3V.from_pretrained(tiny_ckpt), adapter_dir)
    assert len(lora_state_dict(model)) == cases["lora_adapter"]["n_lora_tensors"]
    x = inputs(golden_dir, cases[f"lora_{name}"])
    with torch.no_grad():
        check(model(**x), golden_dir, cases[f"lora_{name}"], cases)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        check(model(**x), golden_dir, cases[f"merged_{name}"], cases)


def test_golden_adapter_changes_the_output(tiny_ckpt, golden_dir, cases):
    # the check above is not vacuous: without the adapter the golden is far away
    z = np.load(golden_dir / "cases" / "lora" / "lora_mf_text_short.npz")
    with torch.no_grad():
        out = Phi3V.from_pretrained(tiny_ckpt)(**inputs(golden_dir, cases["lora_mf_text_short"]))
    assert (out.hidden_states - torch.from_numpy(z["last_hidden_state"])).abs().max() > 0.1


def test_save_adapter_matches_peft_layout(tiny_ckpt, adapter_dir, tmp_path):
    model = load_adapter(Phi3V.from_pretrained(tiny_ckpt), adapter_dir)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-phi3v")
    golden_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(golden_cfg)           # the fields peft 0.11-0.13 write, no more
    for k in golden_cfg:
        if k != "target_modules":
            assert ours_cfg[k] == golden_cfg[k], k
    assert sorted(ours_cfg["target_modules"]) == sorted(golden_cfg["target_modules"])
    golden_t, ours_t = load_file(str(adapter_dir / "adapter_model.safetensors")), load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(ours_t) == set(golden_t)
    assert all(torch.equal(ours_t[k], golden_t[k]) for k in golden_t)
    assert not list(tmp_path.glob(".*"))              # no temporary files left behind


def test_save_load_round_trip(tmp_path):
    model = randomize_b(apply_lora(tiny_model(), rank=4, alpha=16, targets=LM + ["lm_head"] + VISION, init="gaussian"))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] == "gaussian"
    assert sorted(cfg["target_modules"]) == sorted(LM + ["lm_head"] + VISION)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert "base_model.model.model.vision_embed_tokens.img_projection.0.lora_A.weight" in keys
    assert ("base_model.model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0."
            "self_attn.q_proj.lora_A.weight") in keys
    fresh = load_adapter(tiny_model(), tmp_path)
    a, b = lora_state_dict(model), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = fresh.layers[0].self_attn.qkv_proj
    assert m.scaling == 4.0 and m.rank == 4 and m.init == "gaussian"
    ids = torch.randint(0, 299, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_peft_targets_select_exactly_our_modules(tmp_path):
    """peft's own matcher, on the HF names of our linears, selects exactly the LoRA set we saved."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    for targets in (LM, LM + ["lm_head"] + VISION, ["layers.1.self_attn.qkv_proj", "img_projection.2"]):
        model = apply_lora(tiny_model(), rank=2, alpha=4, targets=targets)
        save_adapter(model, tmp_path)
        cfg = LoraConfig(**{k: v for k, v in json.loads((tmp_path / "adapter_config.json").read_text()).items()
                            if k not in ("peft_type", "auto_mapping", "revision")})
        linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))
                   and ".base_layer" not in n and ".lora_" not in n}
        picked = {n for n in linears if check_target_module_exists(cfg, to_hf(n + ".weight")[:-7])}
        assert picked == set(n for n, m in model.named_modules() if isinstance(m, LoRALinear)), targets


# ------------------------------------------------------------------------------------------------
# peft itself, on transformers' Phi3ForCausalLM with the tiny decoder's weights
@pytest.fixture(scope="module")
def hf_phi3(tiny_ckpt):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = Phi3VConfig.from_json(tiny_ckpt / "config.json")
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    return lambda: transformers_phi3(cfg, sd, eos_token_id=2)


def text(n, seed):
    return torch.randint(259, 1842, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.needs_reference
def test_peft_loads_our_adapter(tiny_ckpt, hf_phi3, tmp_path):
    from peft import PeftModel
    ours = randomize_b(apply_lora(Phi3V.from_pretrained(tiny_ckpt), rank=4, alpha=8, targets=LM + ["lm_head"]))
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(hf_phi3(), str(tmp_path)).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == len(lora_state_dict(ours))
    for n, seed in [(48, 0), (300, 1)]:         # short and long LongRoPE factors (orig 256)
        ids = text(n, seed)
        with torch.no_grad():
            a, b = ours(ids).logits, peft_model(input_ids=ids).logits
        assert (a - b).abs().max() <= 1e-4, (n, (a - b).abs().max())
        with torch.no_grad():
            base = Phi3V.from_pretrained(tiny_ckpt)(ids).logits
        assert (a - base).abs().max() > 1e-2      # the adapter matters


@pytest.mark.needs_reference
def test_we_load_a_peft_adapter(tiny_ckpt, hf_phi3, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    peft_model = get_peft_model(hf_phi3(), LoraConfig(r=4, lora_alpha=12, target_modules=["qkv_proj", "down_proj"],
                                                     init_lora_weights="gaussian")).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # peft's base_model_name_or_path is None here
        ours = load_adapter(Phi3V.from_pretrained(tiny_ckpt), tmp_path)
    assert len(lora_state_dict(ours)) == 2 * 2 * 2
    ids = text(60, 2)
    with torch.no_grad():
        a, b = ours(ids).logits, peft_model(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------
def test_zero_b_output_equals_base():
    base, model = tiny_model(), apply_lora(tiny_model(), rank=8, alpha=16, targets=LM + ["lm_head"] + VISION)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 4 + 1 + 6 + 2
    ids = torch.randint(0, 299, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_vision_lora_with_images(tiny_ckpt, golden_dir, cases):
    """LoRA on CLIP and the projector leaves the image path working (B = 0: identical output)."""
    x = inputs(golden_dir, cases["lora_mf_one_image"])
    model = apply_lora(Phi3V.from_pretrained(tiny_ckpt), rank=4, alpha=8, targets=LM + VISION)
    with torch.no_grad():
        a = model(**x).hidden_states
        b = Phi3V.from_pretrained(tiny_ckpt)(**x).hidden_states
        assert torch.equal(a, b)
        randomize_b(model)
        assert (model(**x).hidden_states - b).abs().max() > 1e-3


def test_only_lora_trainable_and_defaults():
    model = apply_lora(tiny_model())
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 * 4 and all(m.rank == 64 and m.scaling == 2.0 for m in lora)
    assert {n.split(".", 2)[2] for n, m in model.named_modules()
            if isinstance(m, LoRALinear)} == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                              "mlp.down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 16 and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert [id(p) for p in lora_parameters(model)] == [id(p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert set(lora_state_dict(model)) == set(trainable)
    # gradients reach exactly the adapter
    randomize_b(model)
    model(torch.randint(0, 299, (1, 9)), labels=torch.randint(0, 299, (1, 9))).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_bf16_base_keeps_fp32_adapter():
    model = apply_lora(tiny_model().to(torch.bfloat16), rank=4, alpha=8)
    m = model.layers[0].self_attn.qkv_proj
    assert m.base_layer.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    out = model(torch.randint(0, 299, (1, 5)))
    assert out.hidden_states.dtype == torch.bfloat16


def test_dropout():
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    det = LoRALinear(lin, rank=4, alpha=8, dropout=0.0).train()
    nn.init.normal_(det.lora_B.weight)
    assert torch.equal(det(x), det(x))
    drop = LoRALinear(lin, rank=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(drop.lora_B.weight)
    assert not torch.equal(drop(x), drop(x))
    drop.eval()
    assert torch.equal(drop(x), drop(x))
    # a model in eval mode gets its new LoRA modules in eval mode too
    model = apply_lora(tiny_model().eval(), rank=2, alpha=4, dropout=0.3)
    assert not any(m.training for m in model.modules())


def test_init_statistics():
    lin = nn.Linear(1024, 512)
    k = LoRALinear(lin, rank=32, alpha=64, init="kaiming")
    g = LoRALinear(lin, rank=32, alpha=64, init="gaussian")
    bound = 1 / math.sqrt(1024)                      # kaiming_uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in))
    a = k.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert g.lora_A.weight.std().item() == pytest.approx(1 / 32, rel=0.03)   # peft: N(0, 1/r^2)
    assert g.lora_A.weight.mean().abs() < 1e-3
    assert torch.all(k.lora_B.weight == 0) and torch.all(g.lora_B.weight == 0)


def test_merge_equals_unmerged():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = LoRALinear(lin, rank=8, alpha=16)
    nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = m(x)
        w0 = lin.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), y, rtol=0, atol=1e-5)
        m.unmerge()
        torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(x), y, rtol=0, atol=1e-5)
    model = randomize_b(apply_lora(tiny_model(), rank=4, alpha=8, targets=LM + ["lm_head", "fc1"]))
    ids = torch.randint(0, 299, (1, 30))
    with torch.no_grad():
        y = model(ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, y, rtol=0, atol=1e-5)
    assert isinstance(model.lm_head, nn.Linear) and not any(".lora_" in k or "base_layer" in k
                                                             for k in model.state_dict())
    assert all(not p.requires_grad for p in model.parameters())


def test_apply_lora_errors():
    with pytest.raises(ValueError, match="no_such_proj"):
        apply_lora(tiny_model(), targets=["qkv_proj", "no_such_proj"])
    with pytest.raises(ValueError, match="self_attn"):
        apply_lora(tiny_model(), targets=["self_attn"])       # not a Linear
    model = apply_lora(tiny_model(), rank=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(tiny_model())


# ------------------------------------------------------------------------------------------------
# bad adapters: every misfit is a ValueError naming the module, and the model is left untouched
def broken(adapter_dir, tmp_path, cfg_edit=None, tensor_edit=None):
    out = tmp_path / "bad"
    shutil.copytree(adapter_dir, out)
    if cfg_edit:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg_edit(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        t = load_file(str(out / "adapter_model.safetensors"))
        tensor_edit(t)
        save_file(t, str(out / "adapter_model.safetensors"))
    return out


QKV0 = "base_model.model.model.layers.0.self_attn.qkv_proj"


@pytest.mark.parametrize("cfg_edit,tensor_edit,match", [
    (lambda c: c.update(r=4), None, r"model\.layers\.\d\.(self_attn|mlp)\.\w+'.*rank 8.*r=4"),
    (lambda c: c["target_modules"].append("no_such_proj"), None, "no_such_proj"),
    (lambda c: c.update(target_modules=["qkv_proj", "o_proj"]), None, r"mlp\.(gate_up|down)_proj.*does not select"),
    (lambda c: c.update(target_modules=LM + ["lm_head"]), None, "lm_head"),
    (None, lambda t: t.update({f"{QKV0}.lora_A.weight": torch.zeros(8, 32)}), r"layers\.0\.self_attn\.qkv_proj.*\[8, 32\]"),
    (None, lambda t: t.update({f"{QKV0}.lora_B.weight": torch.zeros(100, 8)}), r"layers\.0\.self_attn\.qkv_proj.*\[100, 8\]"),
    (None, lambda t: t.pop(f"{QKV0}.lora_B.weight"), r"lora_B.*layers\.0\.self_attn\.qkv_proj"),
    (None, lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.down_proj." in k], r"layers\.1\.mlp\.down_proj"),
    (None, lambda t: t.update({"base_model.model.model.layers.5.mlp.down_proj.lora_A.weight": torch.zeros(8, 128)}),
     r"layers\.5\.mlp\.down_proj.*does not have"),
    (None, lambda t: t.update({f"{QKV0}.lora_embedding_A": torch.zeros(8, 8)}), "lora_embedding_A"),
    (lambda c: c.update(use_dora=True), None, "use_dora"),
    (lambda c: c.update(rank_pattern={"qkv_proj": 4}), None, "rank_pattern"),
    (lambda c: c.update(peft_type="IA3"), None, "IA3"),
    (lambda c: c.update(init_lora_weights="pissa"), None, "pissa"),
    (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
])
def test_bad_adapter_is_a_clear_error(tiny_ckpt, adapter_dir, tmp_path, cfg_edit, tensor_edit, match):
    bad = broken(adapter_dir, tmp_path, cfg_edit, tensor_edit)
    model = Phi3V.from_pretrained(tiny_ckpt)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, bad)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_loading_onto_a_model_with_lora_is_an_error(tiny_ckpt, adapter_dir):
    model = apply_lora(Phi3V.from_pretrained(tiny_ckpt), rank=4, alpha=8)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(ValueError, match="already has LoRA"):
        load_adapter(model, adapter_dir)
    assert all(torch.equal(v, lora_state_dict(model)[k]) for k, v in before.items())


def test_default_style_keys_are_accepted(tiny_ckpt, adapter_dir, tmp_path):
    bad = broken(adapter_dir, tmp_path, tensor_edit=lambda t: t.update(
        {k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    a = lora_state_dict(load_adapter(Phi3V.from_pretrained(tiny_ckpt), bad))
    b = lora_state_dict(load_adapter(Phi3V.from_pretrained(tiny_ckpt), adapter_dir))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_differing_base_model_warns(tiny_ckpt, adapter_dir, tmp_path):
    other = broken(adapter_dir, tmp_path, cfg_edit=lambda c: c.update(
        base_model_name_or_path="microsoft/Phi-3.5-vision-instruct"))
    with pytest.warns(UserWarning, match="Phi-3.5-vision-instruct"):
        model = load_adapter(Phi3V.from_pretrained(tiny_ckpt), other)
    assert len(lora_state_dict(model)) == 16
    # the golden adapter names "tiny-phi3v", the checkpoint directory's own name: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(Phi3V.from_pretrained(tiny_ckpt), adapter_dir)
