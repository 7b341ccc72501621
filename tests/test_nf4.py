"""NF4 quantisation: bitsandbytes golden bytes, error bounds, the NF4Linear autograd contract, QLoRA."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phi3v import Phi3V, Phi3VConfig
from phi3v.hf import hf_state_dict, unused_shapes
from phi3v.lora import LoRALinear, apply_lora, merge_lora
from phi3v.nf4 import (NF4_CODE, NF4Linear, dequantize_nf4, dynamic_map, nf4_bytes_per_param, nf4_nbytes,
                       quantize_nf4, quantize_nf4_tensor)

MAX_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2   # worst rounding, in units of absmax
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def bnb(golden_dir):
    z = np.load(golden_dir / "cases" / "nf4" / "nf4_cases.npz")
    return {k: torch.from_numpy(z[k]) for k in z.files}


def linear_from(w, bias=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# bitsandbytes golden (0.50.2, blocksize 64)
def test_code_tables_equal_bitsandbytes(bnb):
    assert torch.equal(NF4_CODE, bnb["nf4_code"])
    assert torch.equal(NF4_CODE, bnb["quant_map_nf4_nodq"])
    assert torch.equal(dynamic_map(), bnb["nested_quant_map_nf4_dq"])


def test_packed_bytes_and_absmax_identical_without_double_quant(bnb):
    q = quantize_nf4_tensor(bnb["W"], block_size=64, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == bnb["W"].numel() // 2
    assert torch.equal(q.packed, bnb["packed_nf4_nodq"].view(-1))     # high nibble = first element
    assert torch.equal(q.absmax, bnb["absmax_nf4_nodq"])
    assert (dequantize_nf4(q) - bnb["dequant_nf4_nodq"]).abs().max() <= 1e-6


def test_double_quant_within_one_8bit_step(bnb):
    q = quantize_nf4_tensor(bnb["W"], block_size=64, double_quant=True)
    # the 4-bit codes use the exact absmax, so they are bitsandbytes' bytes
    assert torch.equal(q.packed, bnb["packed_nf4_dq"].view(-1))
    torch.testing.assert_close(q.offset, bnb["nested_offset_nf4_dq"], rtol=0, atol=1e-7)
    torch.testing.assert_close(q.nested_absmax, bnb["nested_absmax_nf4_dq"], rtol=0, atol=1e-7)
    # bitsandbytes' 8-bit rounding is not always to the nearest value: at most one code apart
    ours, theirs = q.absmax.long(), bnb["absmax_nf4_dq"].long()
    assert (ours - theirs).abs().max() <= 1
    # and in value: within one 8-bit step (the map's gap at that code, times the nested scale)
    dyn = dynamic_map()
    gaps = torch.cat([dyn[1:] - dyn[:-1], dyn[-1:] - dyn[-2:-1]])
    nested = q.nested_absmax[torch.arange(ours.numel()) // 256]
    step = torch.maximum(gaps[theirs], gaps[(theirs - 1).clamp_min(0)]) * nested
    a_ours = dyn[ours] * nested + q.offset
    a_bnb = dyn[theirs] * nested + bnb["nested_offset_nf4_dq"]
    assert ((a_ours - a_bnb).abs() <= step + 1e-7).all()
    # weights: |code| <= 1, so each block's dequantised values are within that block's step
    dw = (dequantize_nf4(q) - bnb["dequant_nf4_dq"]).abs().view(-1, 64).amax(1)
    assert (dw <= step + 1e-6).all()
    assert (ours != theirs).sum() < 0.05 * ours.numel()   # the rounding differs only rarely


@pytest.mark.parametrize("tag,dq", [("nodq", False), ("dq", True)])
def test_linear_matches_bitsandbytes_linear4bit(bnb, tag, dq):
    layer = NF4Linear.from_linear(linear_from(bnb["W"]), double_quant=dq)
    x, y = bnb[f"linear_x_nf4_{tag}"], bnb[f"linear_y_nf4_{tag}"]
    with torch.no_grad():
        out = layer(x)
    # bitsandbytes' CPU Linear4bit is F.linear on its own dequantised weight: reproduce it first,
    # so the comparison below only measures the dequantisation difference
    torch.testing.assert_close(F.linear(x, bnb[f"dequant_nf4_{tag}"]), y, rtol=1.3e-6, atol=1e-5)
    if not dq:   # identical weights, same fp32 matmul: only summation order could differ
        torch.testing.assert_close(out, y, rtol=1.3e-6, atol=1e-5)
    else:        # |dy| <= sum_j |x_j| |dW_ij|: the (one 8-bit step) absmax difference, propagated
        dw = (layer.dequantize(torch.float32) - bnb["dequant_nf4_dq"]).abs()
        bound = x.abs() @ dw.T + 1e-5
        assert ((out - y).abs() <= bound).all()
        assert (out - y).abs().max() < 0.01 * y.abs().max()


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 160), (7, 9), (3, 1000)])
def test_round_trip_error_bound(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]    # blocks of very different scale
    w.view(-1)[5] = 40.0                                                 # an outlier block
    q = quantize_nf4_tensor(w, double_quant=False)
    err = (w - dequantize_nf4(q)).abs().reshape(-1)
    err = torch.nn.functional.pad(err, (0, (-err.numel()) % 64)).view(-1, 64)
    assert (err <= q.absmax[:, None] * MAX_HALF_GAP * (1 + 1e-6)).all()
    # nearest code: no other level is closer for any element
    b = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64)
    scale = torch.where(q.absmax > 0, q.absmax, torch.ones_like(q.absmax))[:, None]
    dist = ((b / scale)[..., None] - NF4_CODE).abs()                    # [nb, 64, 16]
    got = (dequantize_nf4(q).reshape(-1) - 0)                           # compare chosen vs best distance
    got = torch.nn.functional.pad(got, (0, (-got.numel()) % 64)).view(-1, 64) / scale
    assert ((got - b / scale).abs() <= dist.amin(-1) + 1e-6).all()
    # double quantisation adds the absmax approximation error on top
    q2 = quantize_nf4_tensor(w, double_quant=True)
    a2 = dynamic_map()[q2.absmax.long()] * q2.nested_absmax[torch.arange(q2.absmax.numel()) // 256] + q2.offset
    err2 = torch.nn.functional.pad((w - dequantize_nf4(q2)).abs().reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64)
    assert (err2 <= (a2.abs() * MAX_HALF_GAP + (a2 - q.absmax).abs())[:, None] + 1e-6).all()


def test_zero_block_dequantises_to_zero():
    w = torch.zeros(4, 64)
    w[0] = torch.randn(64)
    q = quantize_nf4_tensor(w)
    assert torch.equal(dequantize_nf4(q)[1:], torch.zeros(3, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [False, True])
def test_nf4linear_is_linear_on_dequantised_weight(dtype, dq):
    lin = linear_from(torch.randn(48, 128) / 11, bias=torch.randn(48))
    layer = NF4Linear.from_linear(lin.to(dtype), double_quant=dq)
    assert layer.bias is not None and not layer.bias.requires_grad
    x = torch.randn(2, 5, 128, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize(dtype), layer.bias.to(dtype)))
    assert torch.equal(layer.to_linear()(x), layer(x))


def test_model_to_dtype_keeps_quantisation_state():
    layer = NF4Linear.from_linear(linear_from(torch.randn(32, 128)))
    w = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)        # float buffers would be rounded; ours are stored as integer bits
    assert torch.equal(layer.dequantize(torch.float32), w)


def saved_tensors(fn):
    """Every tensor autograd saves for backward while fn() runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_gradients_reach_input_and_lora_only_and_no_dequantised_weight_is_saved():
    out_f, in_f = 96, 128
    base = linear_from(torch.randn(out_f, in_f) / 11)
    q = NF4Linear.from_linear(base)
    lora = LoRALinear(q, rank=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, in_f, requires_grad=True)
    y, saved = saved_tensors(lambda: lora(x))
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= out_f * in_f]
    assert not big, f"a full-size float tensor is kept for backward: {big}"
    y.square().sum().backward()
    assert x.grad is not None and lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
    assert all(not p.requires_grad for p in q.parameters()) and all(not b.requires_grad for b in q.buffers())
    # the input gradient equals the one through the dequantised float weight
    ref = LoRALinear(q.to_linear(torch.float32), rank=4, alpha=8)
    ref.load_state_dict(lora.state_dict(), strict=False)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora.lora_A.weight.grad, ref.lora_A.weight.grad, rtol=1e-5, atol=1e-6)
    # the check above can fail: dequantising outside the autograd Function keeps the full weight
    naive = lambda: F.linear(x, q.dequantize(torch.float32).requires_grad_(True))  # noqa: E731
    _, saved = saved_tensors(naive)
    assert any(t.is_floating_point() and t.numel() >= out_f * in_f for t in saved)


def test_qlora_forward_equals_lora_on_dequantised_weights():
    q = NF4Linear.from_linear(linear_from(torch.randn(64, 96) / 10, bias=torch.randn(64)))
    qlora = LoRALinear(q, rank=8, alpha=16, init="gaussian")
    nn.init.normal_(qlora.lora_B.weight, std=0.1)
    lora = LoRALinear(q.to_linear(torch.float32), rank=8, alpha=16)
    with torch.no_grad():
        lora.lora_A.weight.copy_(qlora.lora_A.weight)
        lora.lora_B.weight.copy_(qlora.lora_B.weight)
    x = torch.randn(4, 7, 96)
    with torch.no_grad():
        assert torch.equal(qlora(x), lora(x))


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return Phi3V.from_pretrained(tiny_ckpt)


def text_ids(n=40, seed=0):
    return torch.randint(259, 1842, (1, n), generator=torch.Generator().manual_seed(seed))


def test_quantize_tiny_model_stays_close(tiny_ckpt, tiny):
    model = quantize_nf4(Phi3V.from_pretrained(tiny_ckpt))
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 2 * 4 and all(n.startswith("layers.") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.vision.clip.encoder.layers[0].mlp.fc1, nn.Linear)
    ids = text_ids()
    with torch.no_grad():
        ref, out = tiny(ids).logits, model(ids).logits
    # exactly the float model with the decoder weights replaced by their dequantised values
    swapped = Phi3V.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        for n in names:
            w = swapped.get_submodule(n).weight
            w.copy_(model.get_submodule(n).dequantize(torch.float32))
            # NF4 keeps ~9% relative RMS weight error (4 bits, blockwise absmax)
            assert (w - tiny.get_submodule(n).weight).norm() / w.norm() < 0.1
        torch.testing.assert_close(out, swapped(ids).logits, rtol=1e-5, atol=1e-5)
    # Closeness to the float model. This tiny checkpoint is built to be sensitive (every block moves
    # the output by O(1)): measured, Gaussian noise of the same 9% weight RMS moves the logits by
    # 0.32-0.37 relative; NF4 moves them by 0.27. Bounds: clearly related, clearly not identical.
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.4, rel
    assert F.cosine_similarity(out.view(-1), ref.view(-1), dim=0) > 0.94
    with pytest.raises(ValueError, match="dequantise"):
        hf_state_dict(model)


def test_quantize_clip_too(tiny_ckpt, golden_dir):
    model = quantize_nf4(Phi3V.from_pretrained(tiny_ckpt), targets=["qkv_proj", "o_proj", "gate_up_proj",
                                                                      "down_proj"] + CLIP_TARGETS)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 8 + 6 * 1   # one CLIP block is used
    z = np.load(golden_dir / "cases" / "model" / "mf_one_image.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(z["input_ids"]), pixel_values=torch.from_numpy(z["pixel_values"]),
                    image_sizes=torch.from_numpy(z["image_sizes"]))
    assert torch.isfinite(out.logits).all()


def test_quantize_errors(tiny):
    with pytest.raises(ValueError, match="no_such_proj"):
        quantize_nf4(Phi3V.from_config(Phi3VConfig.tiny(vocab_size=64)), targets=["qkv_proj", "no_such_proj"])
    m = apply_lora(Phi3V.from_config(Phi3VConfig.tiny(vocab_size=64)), rank=2, alpha=4)
    with pytest.raises(ValueError, match="quantise before apply_lora"):
        quantize_nf4(m)


def test_qlora_merge_exports_plain_linears(tiny_ckpt, tmp_path):
    model = apply_lora(quantize_nf4(Phi3V.from_pretrained(tiny_ckpt)), rank=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert isinstance(m.base_layer, NF4Linear)
            nn.init.normal_(m.lora_B.weight, std=0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = text_ids()
    with torch.no_grad():
        before = model(ids).logits
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == model.dtype
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    model.save_pretrained(tmp_path)                                  # official names, no quant state
    again = Phi3V.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, after)


# ------------------------------------------------------------------------------------------------
# memory
def test_bytes_per_param_measured_equals_formula(tiny_ckpt):
    for dq, expect in [(False, 0.5 + 4 / 64), (True, 0.5 + 1 / 64 + 4 / (64 * 256))]:
        model = quantize_nf4(Phi3V.from_pretrained(tiny_ckpt), double_quant=dq)
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        formula = sum(nf4_nbytes((m.out_features, m.in_features), 64, dq) for m in layers)
        params = sum(m.in_features * m.out_features for m in layers)
        assert nf4_bytes_per_param(model) == pytest.approx(formula / params, rel=1e-12)
        # tiny layers: the per-layer tables (16 levels, 256-entry map) add a visible overhead
        # (+4 bytes per layer: the nested absmax count is rounded up to whole 256-blocks)
        tables = (16 * 4 + (256 * 4 + 4 + 4 if dq else 0)) * len(layers) / params
        assert expect < nf4_bytes_per_param(model) <= expect + tables


def frozen_base_bytes(targets, double_quant):
    """Bytes of the frozen Phi-3.5-vision base (bf16 + NF4), built on the meta device (no memory)."""
    cfg = Phi3VConfig()                      # the real sizes: 3072 wide, 32 layers, CLIP ViT-L/14-336
    with torch.device("meta"):
        model = Phi3V(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters()) + sum(math.prod(s) for s in unused_shapes(cfg).values())
    quantize_nf4(model, targets=targets, double_quant=double_quant)   # meta tensors: shapes only
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    size += 2 * sum(math.prod(s) for s in unused_shapes(cfg).values())  # kept for export (hf_extras)
    return n_params, size, nf4_bytes_per_param(model)


def test_real_model_frozen_base_fits_in_3gb():
    n, size, bpp = frozen_base_bytes(None, True)
    assert 4.14e9 < n < 4.16e9                      # Phi-3.5-vision-instruct: 4.15B parameters
    assert bpp == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    # decoder linears in NF4, embeddings/lm_head/CLIP in bf16: 2.92 GB (vs 8.29 GB all bf16)
    assert size < 2.95e9, size
    # the recipe's scope (every linear but lm_head; the projector excluded, it stays bf16 here)
    _, size_all, _ = frozen_base_bytes(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] + CLIP_TARGETS, True)
    assert size_all < 2.5e9, size_all


def test_qlora_under_activation_checkpointing(tiny_ckpt):
    """Non-reentrant recomputation (train.py's default) gives the same adapter gradients as without."""
    model = Phi3V.from_pretrained(tiny_ckpt)
    quantize_nf4(model)
    apply_lora(model, rank=4, alpha=8, init="gaussian")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    ids, grads = text_ids(), []
    for recompute in ("none", "full", "selective"):
        model.configure_training(recompute=recompute)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for n, p in model.named_parameters() if p.requires_grad])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
