"""The image side of Phi-3.5-vision: CLIP ViT-L/14-336 tower and the HD crop embedding.

Matches `Phi3ImageEmbedding` of the reference `modeling_phi3_v.py` (PHI3V_SPEC §4-5) and HF's
`CLIPVisionModel`. Shapes: N crops, P patches per crop (576), C CLIP width (1024), G grid side (24),
g merged side (12), D LM hidden (3072).
Differences from the reference that do not change results: only the CLIP blocks whose output is
used are built (hidden_states[-2] needs 23 of 24), and only real crops are encoded (the reference
also encodes the zero padding crops and then ignores them).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention
from .config import CROP, Phi3VConfig, VisionConfig, crop_grid_tokens
from .recompute import run_clip_layer, run_projector


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py
class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.dtype))               # [N, C, G, G]
        x = x.flatten(2).transpose(1, 2)                           # [N, P, C], row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                             # [N, 1+P, C]
        return x + self.position_embedding.weight.to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # [N, T, C] -> [N, heads, T, C/heads]
        q, k, v = (p(x).view(n, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, None)                               # no mask: every token sees all 577
        return self.out_proj(y.transpose(1, 2).reshape(n, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))             # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(n_layers))


class CLIPVision(nn.Module):
    """CLIP vision transformer truncated after the block whose output Phi-3.5-vision uses."""

    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # [sic], HF's name
        self.encoder = CLIPEncoder(cfg, n_layers)

    def forward(self, pixels: torch.Tensor, recompute: str = "none", compiled: bool = False) -> torch.Tensor:
        """[N, 3, 336, 336] -> patch features [N, P, C] (CLS dropped); layers run under `recompute`."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = run_clip_layer(layer, recompute, compiled, x)
        return x[:, 1:]


# reference: Phi3ImageEmbedding in microsoft/Phi-3.5-vision-instruct modeling_phi3_v.py
class ImageEmbedding(nn.Module):
    """CLIP features of HD crops -> 2x2 merge -> separators -> projector, one row per image token."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        c4 = cfg.image_dim_out * 4
        self.clip = CLIPVision(cfg.vision, cfg.clip_layers_used)
        self.glb_GN = nn.Parameter(torch.empty(1, 1, c4))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, c4))
        self.img_projection = nn.Sequential(nn.Linear(c4, cfg.hidden_size), nn.GELU(),
                                            nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.grid = cfg.vision.grid
        self.frozen = False   # set by freeze_vision: run without building an autograd graph
        self.recompute, self.compiled = "none", False    # set by Phi3V.configure_training

    def merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, G*G, C] -> [N, g, g, 4C]; cell (r,c) = patches (2r,2c),(2r,2c+1),(2r+1,2c),(2r+1,2c+1)."""
        n, _, c = feats.shape
        g = self.grid // 2
        x = feats.reshape(n, g, 2, g, 2, c)                        # [N, g, dy, g, dx, C]
        x = x.permute(0, 1, 3, 2, 4, 5)                            # [N, g, g, dy, dx, C]
        return x.reshape(n, g, g, 4 * c)

    def add_newline(self, grid: torch.Tensor) -> torch.Tensor:
        """[R, Cc, 4C] -> [R*(Cc+1), 4C]: one sub_GN after every row."""
        r = grid.shape[0]
        nl = self.sub_GN.reshape(1, 1, -1).to(grid.dtype).expand(r, 1, -1)
        return torch.cat([grid, nl], dim=1).reshape(-1, grid.shape[-1])

    def hd_features(self, pixel_values: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """pixel_values [n, K, 3, 336, 336], crops [(rows, cols)] of sub-crops per image (python ints:
        no device reads) -> [sum tokens, 4C] before projection."""
        # only the real crops (global + h*w sub-crops) of each image go through CLIP
        real = torch.cat([pixel_values[i, : 1 + hc * wc] for i, (hc, wc) in enumerate(crops)])
        merged = self.merge_2x2(self.clip(real, self.recompute, self.compiled))   # [sum crops, g, g, 4C]
        g = merged.shape[1]
        out, start = [], 0
        for hc, wc in crops:
            glb, sub = merged[start], merged[start + 1: start + 1 + hc * wc]
            start += 1 + hc * wc
            sub = sub.reshape(hc, wc, g, g, -1).permute(0, 2, 1, 3, 4)  # [hc, g, wc, g, 4C]
            sub = sub.reshape(hc * g, wc * g, -1)                        # stitched sub-image grid
            out += [self.add_newline(sub), self.glb_GN.reshape(1, -1).to(sub.dtype), self.add_newline(glb)]
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """-> projected image features [sum tokens, D], in image order."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.hd_features(pixel_values, crops)
            # the model dtype (the projector may be an NF4/LoRA module whose .weight is not a tensor)
            return run_projector(self.img_projection, self.compiled, feats.to(self.glb_GN.dtype))


def check_image_inputs(cfg: Phi3VConfig, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[int]:
    """Validate pixel_values / image_sizes; return the token count of every image."""
    if pixel_values.dim() != 5 or tuple(pixel_values.shape[2:]) != (3, CROP, CROP):
        raise ValueError(f"pixel_values must be [n_images, num_crops+1, 3, {CROP}, {CROP}], "
                         f"got {list(pixel_values.shape)}")
    if image_sizes.dim() != 2 or image_sizes.shape[1] != 2 or image_sizes.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"image_sizes must be [n_images={pixel_values.shape[0]}, 2], got {list(image_sizes.shape)}")
    counts = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        h, w = int(h), int(w)
        if h <= 0 or w <= 0 or h % CROP or w % CROP:
            raise ValueError(f"image_sizes[{i}] = ({h}, {w}) must be positive multiples of {CROP}")
        if (h // CROP) * (w // CROP) + 1 > pixel_values.shape[1]:
            raise ValueError(f"image_sizes[{i}] = ({h}, {w}) needs {(h // CROP) * (w // CROP) + 1} crops but "
                             f"pixel_values holds only {pixel_values.shape[1]} per image")
        counts.append(crop_grid_tokens(h // CROP, w // CROP, cfg.vision.grid // 2))
    return counts
