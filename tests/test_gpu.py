"""GPU checks (issue 8): bf16 vs fp32 on the golden cases, ZeroAdamW on one GPU vs torch AdamW, and the
QLoRA step-0 loss vs LoRA's.

Everything marked `cuda` is deselected by pyproject's addopts and also skips without a GPU; run it
on the GPU machine with `pytest -m cuda tests/test_gpu.py` (PHI3V_GOLDEN pointing at a carried copy
of the golden files, see bench/README.md). The bf16 and QLoRA checks are parametrised over the
device: their CPU variants run in every CPU test run and keep the tolerances below honest.
"""
import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phi3v import Phi3V, Phi3VConfig, apply_lora, quantize_nf4
from phi3v.lora import LoRALinear
from phi3v.data import to_device, training_inputs
from phi3v.nf4 import NF4Linear, bnb_available
from phi3v.optim import ZeroAdamW

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, needs_cuda])]

BF16_CASES = ["mf_text_short", "mf_text_long", "mf_one_image", "mf_two_images", "mf_video_8frames",
              "mf_batch2_left_padding", "mf_batch2_right_padding"]


# ------------------------------------------------------------------------------------------------
# bf16 model vs fp32 model on the golden cases
@pytest.fixture(scope="module")
def golden_cases(golden_dir):
    return {c["name"]: c for c in json.loads((golden_dir / "cases" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    made = {}

    def get(device, dtype):
        if (device, dtype) not in made:
            made[device, dtype] = Phi3V.from_pretrained(tiny_ckpt, dtype=dtype, device=device).eval()
        return made[device, dtype]
    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_close_to_fp32_on_golden_cases(models, golden_cases, golden_dir, device, name):
    """The bf16 model tracks the fp32 one; the fp32 model on this device still matches the golden file.

    Tolerance. The issue asks for 1e-2; element-wise 1e-2 (abs or rel) is not reachable in bf16 on
    this checkpoint, whatever the implementation: it is built so every block moves the output by
    O(1) (golden README), hidden states reach |h| ~ 4-5, and bf16 keeps 8 significant bits. Measured
    on CPU (torch 2.13): bf16 vs fp32 relative Frobenius error 1.6-2.3% over these cases, max |d|
    0.10-0.27, 25-40% of elements outside 1e-2 abs + 1e-2 rel; merely rounding the fp32 weights to
    bf16 (fp32 compute) already gives 0.9-1.2%, and fp32 weights under bf16 autocast 1.3-1.7%.
    So 1e-2 is applied where it holds with margin: the per-token loss (relative), and the hidden
    states get 3e-2 relative Frobenius error and max |d| <= 10% of max |h|. A real bf16 bug (a wrong
    cast, fp16 overflow, a bf16 softmax or RoPE table) moves these by far more.
    """
    case = golden_cases[name]
    z = np.load(golden_dir / "cases" / case["file"])
    z = {k: torch.from_numpy(z[k]) for k in z.files}
    inputs = {k: z[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in z}
    labels = z["labels"].to(device) if "labels" in z else None
    with torch.no_grad():
        out32 = models(device, torch.float32)(**inputs, labels=labels)
        out16 = models(device, torch.bfloat16)(**inputs, labels=labels)
    keep = z["attention_mask"].bool().to(device)
    h32, h16 = out32.hidden_states[keep], out16.hidden_states.float()[keep]
    # fp32 on this device vs the reference (catches a device-specific kernel problem, e.g. TF32)
    tol = max(1e-4, case["recommended_tolerance"]["last_hidden_state_atol"])
    d_ref = (h32.cpu() - z["last_hidden_state"][z["attention_mask"].bool()]).abs().max().item()
    assert d_ref <= tol, f"{name}: fp32 on {device} vs golden max|d| {d_ref:.3g} > {tol}"
    assert torch.isfinite(h16).all()
    rel = ((h16 - h32).norm() / h32.norm()).item()
    dmax = (h16 - h32).abs().max().item()
    assert rel <= 3e-2, f"{name}: bf16 relative error {rel:.3g}"
    assert dmax <= 0.1 * h32.abs().max().item(), f"{name}: bf16 max|d| {dmax:.3g}"
    if labels is not None and out32.loss is not None:
        dl = abs(out16.loss.item() - out32.loss.item()) / abs(out32.loss.item())
        assert dl <= 1e-2, f"{name}: bf16 loss {out16.loss.item():.5f} vs fp32 {out32.loss.item():.5f}"


# ------------------------------------------------------------------------------------------------
# ZeroAdamW on one GPU == torch.optim.AdamW
SHAPES = {"w1": (257, 129), "b1": (257,), "w2": (65, 257), "emb": (3000, 64)}


def toy(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter((torch.randn(s, generator=g) * 0.3).to(device=device, dtype=dtype))
            for n, s in SHAPES.items()}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_zero_adamw_one_gpu_matches_torch_adamw(fused):
    """Same gradients in -> same weights out, with 1/n_tokens scaling, clipping (some steps clipped,
    some not), decay on matrices only. ZeroAdamW runs torch's fused kernel, as AdamW(fused=True) (what
    the HF baseline uses) does: 1e-5 against it; on CUDA that kernel rounds differently from
    foreach=False (1e-4; on CPU the two agree to 1e-5, tests/test_optim.py)."""
    dev = torch.device("cuda")
    ours, ref = toy(dev), toy(dev)
    no_decay = lambda n, p: p.dim() < 2                                     # noqa: E731
    opt = ZeroAdamW(list(ours.items()), lr=3e-2, weight_decay=0.1, no_decay=no_decay, max_grad_norm=1.0)
    assert opt.world == 1 and opt.master.is_cuda
    decay = [p for n, p in ref.items() if not no_decay(n, p)]
    skip = [p for n, p in ref.items() if no_decay(n, p)]
    kw = {"fused": True} if fused else {"foreach": False}
    ref_opt = torch.optim.AdamW([{"params": decay}, {"params": skip, "weight_decay": 0.0}], lr=3e-2,
                                betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1, **kw)
    g = torch.Generator(device=dev).manual_seed(1)
    clipped = []
    for step in range(6):
        n_tokens = 7 + step
        for n in SHAPES:   # sum-reduced "loss" gradients, large on odd steps so clipping kicks in
            grad = torch.randn(SHAPES[n], generator=g, device=dev) * (40.0 if step % 2 else 0.5)
            ours[n].grad, ref[n].grad = grad.clone(), grad.clone()
        norm = opt.step(grad_scale=1.0 / n_tokens)
        opt.zero_grad()
        for p in ref.values():
            p.grad.mul_(1.0 / n_tokens)
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0).item()
        ref_opt.step()
        ref_opt.zero_grad()
        clipped.append(ref_norm > 1.0)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        tol = {"rtol": 1e-5, "atol": 1e-6} if fused else {"rtol": 1e-4, "atol": 1e-6}
        for n in SHAPES:
            torch.testing.assert_close(ours[n].data, ref[n].data, **tol, msg=lambda m: f"step {step} {n}: {m}")
    assert any(clipped) and not all(clipped)


@pytest.mark.cuda
@needs_cuda
def test_zero_adamw_one_gpu_bf16_params():
    """bf16 parameters (full fine-tuning): fp32 masters follow fp32 AdamW (the same fused kernel), the
    params are their bf16 copy."""
    dev = torch.device("cuda")
    ours, ref = toy(dev, torch.bfloat16), {n: torch.nn.Parameter(p.detach().float()) for n, p in toy(dev).items()}
    for n in SHAPES:    # start from the same (bf16-representable) values
        ref[n].data.copy_(ours[n].data.float())
    opt = ZeroAdamW(list(ours.items()), lr=1e-3, weight_decay=0.0, max_grad_norm=0.0)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-3, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.0,
                                fused=True)
    g = torch.Generator(device=dev).manual_seed(2)
    for _ in range(3):
        for n in SHAPES:
            grad = torch.randn(SHAPES[n], generator=g, device=dev).bfloat16()
            ours[n].grad, ref[n].grad = grad, grad.float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
    for n, off in zip(opt.names, opt.offsets):
        master = opt.master[off:off + ours[n].numel()].view(ours[n].shape)
        torch.testing.assert_close(master, ref[n].data, rtol=1e-5, atol=1e-6)
        assert ours[n].dtype == torch.bfloat16 and torch.equal(ours[n].data, master.bfloat16())


# ------------------------------------------------------------------------------------------------
# QLoRA step-0 loss vs bf16 LoRA
def lora_loss(model, ids, labels):
    batch = to_device(training_inputs(ids.cpu(), torch.zeros_like(ids.cpu()), labels.cpu()), ids.device)
    return model.training_loss(batch) / batch["targets"].numel()


def dequantised_copy(model):
    """The same LoRA model with every NF4 base replaced by a plain Linear of its dequantised weight."""
    d = copy.deepcopy(model)
    for m in d.modules():
        if isinstance(m, LoRALinear) and isinstance(m.base_layer, NF4Linear):
            m.base_layer = m.base_layer.to_linear().requires_grad_(False)
    return d


@pytest.mark.parametrize("backend", ["torch", pytest.param("bnb", marks=pytest.mark.skipif(
    not bnb_available(), reason="bitsandbytes not installed"))])
@pytest.mark.parametrize("device", DEVICES)
def test_qlora_step0_loss_equals_lora(device, backend):
    """Why these comparisons. LoRA's B is zero at init, so at step 0 both adapters add exactly
    nothing and QLoRA differs from bf16 LoRA only in its base weights: NF4 (dequantised to bf16 in
    every matmul) instead of bf16. Hence:
      1. QLoRA == LoRA on the *dequantised* base, exactly (same bf16 weights, same kernels); its loss
         and adapter gradients too. With bitsandbytes' kernels: within bf16 rounding (1e-3).
      2. QLoRA vs LoRA on the original bf16 base: the difference is the quantisation error alone,
         ~9% relative RMS per weight. On this tiny random model (Phi3VConfig.tiny, seed 0) the
         step-0 mean loss moved by 0.18% on CPU (0.2-0.9% over other seeds and the golden
         checkpoint), so the issue's 1e-2 (relative) holds with margin for this fixed model.
    """
    if backend == "bnb" and device != "cuda":
        pytest.skip("bitsandbytes' 4-bit kernels run on CUDA inputs only")
    cfg = Phi3VConfig.tiny()
    base = Phi3V.from_config(cfg, seed=0, dtype=torch.bfloat16, device=device).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(259, 1842, (1, 64), generator=g).to(device)
    labels = ids.clone()
    labels[:, :16] = -100

    lora = copy.deepcopy(base)
    torch.manual_seed(1)
    apply_lora(lora, rank=64, alpha=128, init="gaussian")
    qlora = quantize_nf4(copy.deepcopy(base), backend=backend)
    torch.manual_seed(1)
    apply_lora(qlora, rank=64, alpha=128, init="gaussian")
    deq = dequantised_copy(qlora)
    for m in (lora, qlora, deq):
        assert all(float(x.lora_B.weight.detach().abs().max()) == 0 for x in m.modules() if isinstance(x, LoRALinear))

    losses = {}
    for name, m in (("lora", lora), ("qlora", qlora), ("deq", deq)):
        loss = lora_loss(m, ids, labels)
        loss.backward()
        losses[name] = loss.detach().float()
    grads = lambda m: torch.cat([x.lora_B.weight.grad.flatten() for x in m.modules()   # noqa: E731
                                 if isinstance(x, LoRALinear)])
    if backend == "torch":
        assert torch.equal(losses["qlora"], losses["deq"]), (losses["qlora"].item(), losses["deq"].item())
        assert torch.equal(grads(qlora), grads(deq))
    else:
        torch.testing.assert_close(losses["qlora"], losses["deq"], rtol=1e-3, atol=0)
        assert F.cosine_similarity(grads(qlora), grads(deq), dim=0) > 0.999
    rel = abs(losses["qlora"].item() - losses["lora"].item()) / losses["lora"].item()
    assert rel <= 1e-2, f"QLoRA step-0 loss {losses['qlora'].item():.5f} vs bf16 LoRA {losses['lora'].item():.5f}"
    assert rel > 0, "NF4 changed nothing: the base was not quantised"


# ------------------------------------------------------------------------------------------------
# the optional flash-attn path against SDPA
@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_path_matches_sdpa(dtype, monkeypatch):
    """Attention's flash-attn branch (taken for causal CUDA fp16/bf16) equals the SDPA branch: same
    layer, same input, once with flash-attn and once with it switched off."""
    from phi3v import attention as attention_py
    from phi3v import model as model_py
    torch.manual_seed(0)
    cfg = Phi3VConfig.tiny(hidden_size=256, num_attention_heads=4)    # head_dim 64
    layer = model_py.Attention(cfg).to("cuda", dtype)
    x = torch.randn(2, 300, cfg.hidden_size, device="cuda", dtype=dtype)
    pos = torch.arange(300, device="cuda").expand(2, 300)
    cos, sin = model_py.rope_cos_sin(cfg, pos, False, dtype)
    with torch.no_grad():
        assert attention_py.use_flash_attn(x.view(2, 300, 4, 64).transpose(1, 2))
        flash = layer(x, cos, sin, "causal")
        monkeypatch.setattr(attention_py, "FLASH_ATTN", False)
        sdpa = layer(x, cos, sin, "causal")
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# activation offloading (--offload_activations) changes no bit
@pytest.mark.parametrize("recompute", ["full", "none"])
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
@pytest.mark.parametrize("device", DEVICES)
def test_offload_activations_changes_no_bit(device, mode, recompute, monkeypatch):
    """The same micro-steps with what autograd saves moved to host memory (pinned, non-blocking copies
    on CUDA) and back give bitwise the same loss and gradients, and the hooks did move tensors: every
    saved tensor here (the size limit set to 0), with the RoPE tables, shared by all blocks, once."""
    from phi3v import recompute as rc
    from phi3v.finetune import prepare
    from phi3v.memory import sample_batch
    monkeypatch.setattr(rc, "MIN_OFFLOAD_BYTES", 0)
    moved, real_init = [], rc._OnHost.__init__

    def counting_init(self, t):          # records the shape of every tensor moved to the host
        moved.append(tuple(t.shape))
        real_init(self, t)
    monkeypatch.setattr(rc._OnHost, "__init__", counting_init)
    cfg = Phi3VConfig.tiny()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    plain = prepare(Phi3V.from_config(cfg, seed=0, dtype=dtype, device=device), mode, seed=0)
    for m in plain.modules():    # non-zero LoRA B: every adapter gets a gradient path through it
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    offloaded = copy.deepcopy(plain)
    plain.configure_training(recompute=recompute)
    offloaded.configure_training(recompute=recompute, offload_activations=True)
    batches = [to_device(sample_batch(cfg, task, seed=i), torch.device(device)) for i, task in
               enumerate(("docvqa", "nlvr2"))]
    losses = {}
    for m in (plain, offloaded):
        m.train()
        losses[m] = [m.training_loss(b) for b in batches]
        for loss in losses[m]:
            loss.backward()
    assert moved, "nothing was offloaded"
    tables = [s for s in moved if s[-1] == cfg.head_dim and all(d == 1 for d in s[:-2])]   # cos, sin [1, .., T, hd]
    assert len(tables) == 2 * len(batches), tables
    for a, b in zip(losses[plain], losses[offloaded]):
        assert torch.equal(a, b)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in offloaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n
