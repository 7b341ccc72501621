"""NF4 (4-bit NormalFloat) weight quantisation written from scratch, the frozen base of QLoRA.

Matches bitsandbytes' `quantize_4bit(quant_type="nf4")` / `Linear4bit` numerics (QLoRA paper,
Dettmers et al. 2023): the weight is flattened, cut into blocks of 64, each block is scaled by its
absmax and every value is replaced by the index of the nearest of 16 NF4 levels; two 4-bit indices
share a byte, the first element in the high nibble. Optional double quantisation stores the
absmax values themselves in 8 bits: subtract their mean, then blockwise (256) quantise with
bitsandbytes' signed 8-bit dynamic map. Packed bytes and absmax are byte-identical to
bitsandbytes without double quantisation; with it, our nearest-value rounding of the absmax may
differ from bitsandbytes' by one 8-bit step.

`NF4Linear` is a module swap (STYLE practice 6): `quantize_nf4(model)` replaces the decoder's
frozen `nn.Linear`s before `apply_lora`, and LoRA wraps an `NF4Linear` exactly like an
`nn.Linear`. Its forward dequantises inside a custom autograd Function that saves only the packed
state, so no full-size weight is kept for backward.

Dequantisation is one custom op, `torch.ops.phi3v.dequantize_nf4`: opaque to `torch.compile` and
shape-only on the meta device. On CUDA it runs a Triton kernel when triton is installed
(nf4_triton.py), elsewhere a chunked torch path; both compute code[nibble] * absmax[block] in
float32 and round once to the output dtype, so they agree bit for bit.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LM_LINEARS

# The 16 NF4 levels (quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0), as float32 values
# identical to bitsandbytes' table.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)

NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantised absmax values


def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic tree" map (256 sorted values in [-1, 1]).

    For each decade 10^(i-6), i = 0..6, the midpoints of 2^i equal steps over [0.1, 1] (both signs),
    plus 0 and 1: fine resolution near zero, where most centred absmax values fall.
    """
    data = []
    for i in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each element (ties go to the lower one)."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, mids.to(x.device), out_int32=True).to(torch.uint8)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flat float32 view of x cut into [n_blocks, block], zero-padded at the end (pads never raise an absmax)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    return F.pad(flat, (0, pad)).view(-1, block)


def _absmax_scale(absmax: torch.Tensor) -> torch.Tensor:
    # an all-zero block has absmax 0: divide by 1 instead, so every value lands on the exact 0 code
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


@dataclass
class NF4Weight:
    """A quantised tensor. absmax is float32 [n_blocks], or uint8 when double-quantised (then
    absmax = nested_code[absmax] * nested_absmax[i // 256] + offset)."""
    packed: torch.Tensor                      # uint8 [ceil(numel / 2)], first element in the high nibble
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = 64
    code: torch.Tensor = NF4_CODE
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks / 256)]
    nested_code: torch.Tensor | None = None    # float32 [256], the dynamic map
    offset: torch.Tensor | None = None         # float32 scalar, mean of the absmax values

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def quantize_nf4_tensor(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise `w` (any float dtype, any shape) to NF4 with blockwise absmax, optionally double-quantised."""
    if not w.is_floating_point():
        raise ValueError(f"NF4 quantises floating-point tensors, got {w.dtype}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    b = _blocks(w.detach(), block_size)                           # [nb, block]
    absmax = b.abs().amax(dim=1)                                   # [nb]
    idx = _nearest(b / _absmax_scale(absmax)[:, None], NF4_CODE)   # [nb, block] in 0..15
    idx = idx.view(-1)[: w.numel() + (w.numel() % 2)].view(-1, 2)  # pairs; odd numel keeps one pad code
    packed = (idx[:, 0] << 4) | idx[:, 1]                          # high nibble = first element
    q = NF4Weight(packed.contiguous(), absmax, tuple(w.shape), block_size, NF4_CODE.to(w.device))
    if double_quant:
        offset = absmax.mean()
        nb = _blocks(absmax - offset, NESTED_BLOCK)                # [n_nested, 256]
        nested_absmax = nb.abs().amax(dim=1)
        dyn = dynamic_map().to(w.device)
        q.absmax = _nearest(nb / _absmax_scale(nested_absmax)[:, None], dyn).view(-1)[: absmax.numel()]
        q.nested_absmax, q.nested_code, q.offset = nested_absmax, dyn, offset
    return q


def block_absmax(absmax, nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    """Float32 absmax per block [n_blocks], undoing the double quantisation if there is one.

    nested_code[absmax] * nested_absmax[block // 256] + offset, as two separate float32 ops: done
    here in torch for every backend (1/64 of the elements), so no kernel can contract the multiply
    and add into one FMA and round differently.
    """
    if nested_absmax is None:
        return absmax
    nested = nested_absmax.repeat_interleave(NESTED_BLOCK)[: absmax.numel()]   # [n_blocks]
    return nested_code.index_select(0, absmax.int()).mul_(nested).add_(offset)


CHUNK = 1 << 20   # elements per step of the torch path: bounds its temporaries to 6 MiB


def _dequantize_chunk(packed, scale, pairs, e0: int, e1: int, block_size: int) -> torch.Tensor:
    """Float32 weight elements [e0, e1) (e0 a multiple of block_size): code[nibble] * scale[block]."""
    # one int32 index per byte (2 bytes per element), both levels per lookup: float32 [e1 - e0 (+1 pad)]
    vals = pairs.index_select(0, packed[e0 // 2: (e1 + 1) // 2].int()).view(-1)
    b0, full = e0 // block_size, (e1 - e0) // block_size
    vals[: full * block_size].view(full, block_size).mul_(scale[b0: b0 + full, None])
    if full * block_size < vals.numel():             # the weight's last, partial block (odd numel: + pad)
        vals[full * block_size:].mul_(scale[b0 + full])
    return vals[: e1 - e0]


def _dequantize_torch(packed, scale, code, shape, block_size, dtype) -> torch.Tensor:
    """code[nibble] * scale[block] in float32, rounded once to dtype, written one chunk at a time.

    Temporaries per chunk element: an int32 index per byte (2 bytes) and the float32 product (4),
    so at most 6 x CHUNK bytes whatever the weight size (plus the float32 scale, 4 per block).
    """
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    # byte -> its two levels, high nibble first: one lookup per byte, no shifts, no int64 indices
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)    # [256, 2] float32
    step = max(block_size, CHUNK - CHUNK % block_size)                          # whole blocks per chunk
    for e0 in range(0, numel, step):                 # block_size is even: e0 starts on a byte boundary
        e1 = min(e0 + step, numel)
        out[e0:e1] = _dequantize_chunk(packed, scale, pairs, e0, e1, block_size)   # the one rounding
    return out.view(shape)


TRITON = importlib.util.find_spec("triton") is not None   # optional (the `gpu` extra)


def _check(packed, absmax, code, nested_absmax, shape, block_size, dtype) -> None:
    """Shapes and dtypes only (also runs on fake / meta tensors)."""
    numel, n_blocks = math.prod(shape), -(-math.prod(shape) // block_size)
    if packed.dtype != torch.uint8 or packed.shape != ((numel + 1) // 2,):
        raise ValueError(f"dequantize_nf4: packed must be uint8 [{(numel + 1) // 2}] for shape {list(shape)}, "
                         f"got {packed.dtype} {list(packed.shape)}")
    want = torch.uint8 if nested_absmax is not None else torch.float32
    if absmax.dtype != want or absmax.shape != (n_blocks,):
        raise ValueError(f"dequantize_nf4: absmax must be {want} [{n_blocks}], got {absmax.dtype} {list(absmax.shape)}")
    if code.dtype != torch.float32 or code.shape != (16,):
        raise ValueError(f"dequantize_nf4: code must be float32 [16], got {code.dtype} {list(code.shape)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize_nf4: output dtype must be float32, bfloat16 or float16, got {dtype}")


@torch.library.custom_op(
    "phi3v::dequantize_nf4", mutates_args=(),
    schema="(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
           "Tensor? offset, int[] shape, int block_size, ScalarType dtype, bool backward=False) -> Tensor")
def _dequantize_nf4_op(packed, absmax, code, nested_absmax, nested_code, offset, shape, block_size, dtype,
                       backward=False):
    """Packed NF4 (uint8 [ceil(numel / 2)]) -> weight of `shape` in `dtype`; float state is float32.

    `backward` changes nothing in the result. The NF4 linear sets it when it recomputes the weight
    for the input gradient: two calls with identical arguments would be merged by AOTAutograd's
    CSE of the joint forward+backward graph, and `torch.compile` would then save the one weight
    for backward (2 bytes per element) instead of recomputing it from the packed state.
    """
    _check(packed, absmax, code, nested_absmax, shape, block_size, dtype)
    scale = block_absmax(absmax, nested_absmax, nested_code, offset)
    if packed.is_cuda and TRITON:
        from . import nf4_triton
        return nf4_triton.dequantize(packed, scale, code, shape, block_size, dtype)
    return _dequantize_torch(packed, scale, code, shape, block_size, dtype)


@_dequantize_nf4_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, shape, block_size, dtype, backward=False):
    # also the meta-device kernel: shapes only, no temporaries
    _check(packed, absmax, code, nested_absmax, shape, block_size, dtype)
    return packed.new_empty(shape, dtype=dtype)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code[nibble] * absmax[block] in float32, then cast to `dtype` (bitsandbytes' formula)."""
    return torch.ops.phi3v.dequantize_nf4(q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset,
                                          list(q.shape), q.block_size, dtype)


# ------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor | None) -> torch.Tensor | None:
    # float32 quantisation state is stored as int32 bits: nn.Module.to(dtype) / .half() cast every
    # floating buffer, which would round the absmax values; integer buffers only follow the device
    return None if t is None else t.float().clone().view(torch.int32)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.float32)


def bnb_available() -> bool:
    """bitsandbytes installed (it is an optional CUDA backend, never required)."""
    return importlib.util.find_spec("bitsandbytes") is not None


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + b that saves only the packed state; W is rebuilt for the input grad."""

    @staticmethod
    def forward(ctx, x, bias, shape: list[int], block_size: int, *state):
        ctx.shape, ctx.block_size = shape, block_size
        ctx.save_for_backward(*state)
        w = torch.ops.phi3v.dequantize_nf4(*state, shape, block_size, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        # read saved_tensors once: non-reentrant activation checkpointing allows a single unpack
        state = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * (4 + len(state))
        # backward=True: not merged with the forward's call under torch.compile, so W is recomputed
        # here from the packed state instead of being saved (see the op's docstring)
        w = torch.ops.phi3v.dequantize_nf4(*state, ctx.shape, ctx.block_size, grad_out.dtype, backward=True)
        # base weight and bias are frozen: a gradient for the input only
        return (grad_out.matmul(w), None, None, None) + (None,) * len(state)


class NF4Linear(nn.Module):
    """A frozen Linear stored as NF4 (+ optional bias); forward dequantises to the input's dtype."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                 backend: str = "torch"):
        super().__init__()
        if backend not in ("torch", "bnb"):
            raise ValueError(f"NF4Linear backend must be 'torch' or 'bnb', got {backend!r}")
        if backend == "bnb" and not bnb_available():
            raise ValueError("NF4Linear backend='bnb' needs bitsandbytes (pip install bitsandbytes)")
        # "bnb": bitsandbytes' 4-bit matmul on CUDA inputs, same packed layout; CPU inputs use ours
        self.backend = backend
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight, got shape {list(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.block_size = q.block_size
        self.compute_dtype = compute_dtype   # dtype of the original weight: default of dequantize()
        # "quant" in every buffer name: hf_state_dict refuses them (dequantise / merge before export)
        self.register_buffer("quant_packed", q.packed)
        self.register_buffer("quant_absmax", q.absmax if q.double_quant else _bits(q.absmax))
        self.register_buffer("quant_code", _bits(q.code))
        self.register_buffer("quant_nested_absmax", _bits(q.nested_absmax))
        self.register_buffer("quant_nested_code", _bits(q.nested_code))
        self.register_buffer("quant_offset", _bits(q.offset))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True, block_size: int = 64,
                    backend: str = "torch") -> "NF4Linear":
        q = quantize_nf4_tensor(linear.weight, block_size=block_size, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype=linear.weight.dtype, backend=backend)

    @property
    def double_quant(self) -> bool:
        return self.quant_nested_absmax is not None

    def _state(self) -> tuple[torch.Tensor, ...]:
        """The stored buffers (float state as int32 bits)."""
        ts = (self.quant_packed, self.quant_absmax, self.quant_code)
        return ts + ((self.quant_nested_absmax, self.quant_nested_code, self.quant_offset) if self.double_quant else ())

    def _op_state(self) -> tuple[torch.Tensor | None, ...]:
        """packed, absmax, code, nested_absmax, nested_code, offset: the op's arguments (float32 views)."""
        absmax = self.quant_absmax if self.double_quant else _float(self.quant_absmax)
        return (self.quant_packed, absmax, _float(self.quant_code), _float(self.quant_nested_absmax),
                _float(self.quant_nested_code), _float(self.quant_offset))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.ops.phi3v.dequantize_nf4(*self._op_state(), [self.out_features, self.in_features],
                                              self.block_size, dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen nn.Linear holding the dequantised weight (for merge / export)."""
        dtype = dtype or self.compute_dtype
        w = self.dequantize(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "bnb" and x.is_cuda:
            return self._forward_bnb(x)
        return _NF4Matmul.apply(x, self.bias, [self.out_features, self.in_features], self.block_size,
                                *self._op_state())

    def _forward_bnb(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' fused 4-bit matmul on the same packed layout (optional, CUDA only)."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState
        state2 = None
        absmax = self.quant_absmax
        if self.double_quant:
            state2 = QuantState(absmax=_float(self.quant_nested_absmax), code=_float(self.quant_nested_code),
                                blocksize=NESTED_BLOCK, dtype=torch.float32)
        else:
            absmax = _float(absmax)
        qs = QuantState(absmax=absmax, shape=torch.Size((self.out_features, self.in_features)),
                        code=_float(self.quant_code), blocksize=self.block_size, quant_type="nf4", dtype=x.dtype,
                        offset=_float(self.quant_offset) if self.double_quant else None, state2=state2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.quant_packed.view(-1, 1).t(), quant_state=qs, bias=bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


# ------------------------------------------------------------------------------------------------
def quantize_nf4(model: nn.Module, targets=None, double_quant: bool = True, block_size: int = 64,
                 backend: str = "torch") -> nn.Module:
    """Swap frozen nn.Linears for NF4Linear in place (QLoRA base); returns the model.

    Default: the language model decoder's linears (under `layers.`); `lm_head` and the vision tower
    stay in the model dtype. `targets` (names matched exactly or as a `.`-suffix, like peft) replaces
    that set. Call before `apply_lora`: LoRA then wraps the NF4Linear. backend="bnb" runs CUDA
    inputs through bitsandbytes' kernels (optional, same numerics within rounding).
    """
    default = targets is None
    targets = list(LM_LINEARS if default else ([targets] if isinstance(targets, str) else targets))
    if not targets:
        raise ValueError("quantize_nf4: empty targets")
    swaps, seen = [], set()
    for name, mod in model.named_modules():
        if default and not name.startswith("layers."):
            continue
        hit = [t for t in targets if name == t or name.endswith("." + t)]
        if not hit:
            continue
        seen.update(hit)
        if isinstance(mod, NF4Linear):
            continue
        if not isinstance(mod, nn.Linear):   # e.g. a LoRALinear: NF4 must be the base LoRA wraps
            raise ValueError(f"quantize_nf4: target {hit[0]!r} matches {name!r}, a {type(mod).__name__}, "
                             "not nn.Linear (quantise before apply_lora)")
        swaps.append((name, mod))
    missing = [t for t in targets if t not in seen]
    if missing:
        raise ValueError(f"quantize_nf4: target(s) {missing} match no module of the model")
    for name, mod in swaps:
        parent, _, leaf = name.rpartition(".")
        q = NF4Linear.from_linear(mod, double_quant=double_quant, block_size=block_size, backend=backend)
        q.train(mod.training)
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return model


def nf4_nbytes(shape: tuple[int, ...], block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes an NF4Linear of this weight shape stores (without bias), computed without allocating."""
    n = math.prod(shape)
    nb = -(-n // block_size)
    size = -(-n // 2) + 16 * 4                                   # packed nibbles + code table
    if double_quant:
        return size + nb + 4 * -(-nb // NESTED_BLOCK) + 256 * 4 + 4  # u8 absmax, nested absmax, map, offset
    return size + 4 * nb                                         # float32 absmax


def nf4_bytes_per_param(model: nn.Module) -> float:
    """Stored bytes per weight parameter over the model's NF4Linears (0.5 + scale overhead)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError("the model has no NF4Linear (call quantize_nf4 first)")
    nbytes = sum(sum(b.numel() * b.element_size() for b in m._state()) for m in layers)
    return nbytes / sum(m.in_features * m.out_features for m in layers)
