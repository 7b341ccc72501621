"""Phi-3.5-vision processor: HD image crops, tokenizer, chat template and prompt expansion.

Matches Microsoft's remote code for microsoft/Phi-3.5-vision-instruct (`processing_phi3_v.py`:
`Phi3VImageProcessor` and `Phi3VProcessor`, see ../shared/reference/PHI3V_SPEC.md §6-7) output for
output: the same uint8 HD image (Pillow bilinear resize, white padding), the same float32
normalisation, the same bicubic global view, crop order, token counts and prompt ids (a BOS after
every image run, image k as a run of -k). Differences are deliberate and only in error handling:
inputs the reference crashes on (or rejects with an assert) raise a ValueError saying why.

Shapes: N images, C = num_crops, H x W the padded HD image (multiples of 336), h x w = H/336 x W/336.
"""
import io
import json
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, processors

from .config import CROP, crop_grid_tokens
from .hf import hub_snapshot
from .jsonfile import Fields, read_json, show, write_atomic, write_text_atomic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")   # the reference's pattern (split + findall); the one home
# what Pillow raises on unreadable/corrupt/unsupported images
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "preprocessor_config.json")


# ----------------------------------------------------------------------------- geometry


def _check_num_crops(num_crops) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, numbers.Integral) or num_crops < 1:
        raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")
    return int(num_crops)


def _hd_geometry(width: int, height: int, num_crops: int) -> tuple[bool, int, int, int]:
    """HD_transform sizes in the landscape frame: (transposed, resized_w, resized_h, padded_h).

    Mirrors the reference arithmetic exactly (Python doubles, int() truncation): portrait
    images are transposed, `scale` is the largest integer with scale*ceil(scale/ratio) <= num_crops,
    the image is resized to width 336*scale and height int(width/ratio), then padded to a multiple
    of 336 in height. Raises where the reference would crash (empty image, zero-height resize).
    """
    num_crops = _check_num_crops(num_crops)
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} (WxH) is empty")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP
    new_h = int(new_w / ratio)
    if new_h == 0:
        w, h = (height, width) if transposed else (width, height)
        raise ValueError(
            f"image size {w}x{h} (WxH) is too elongated for num_crops={num_crops}: its short side "
            f"would be resized to 0 pixels (long side {new_w}); pad or crop the image, or use "
            f"more crops")
    padded_h = -(-new_h // CROP) * CROP
    return transposed, new_w, new_h, padded_h


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of the padded HD image for an input of width x height, without decoding it."""
    transposed, new_w, _, padded_h = _hd_geometry(width, height, num_crops)
    return (padded_h, new_w) if transposed else (new_w, padded_h)


def tokens_for_hd_size(hd_width: int, hd_height: int) -> int:
    """Image tokens of one image whose padded HD size is hd_width x hd_height (PHI3V_SPEC §5.8)."""
    return crop_grid_tokens(hd_height // CROP, hd_width // CROP)


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Image tokens for an input image of width x height (calc_num_image_tokens_from_image_size).

    Unlike the reference helper it raises ValueError for sizes the image processor rejects.
    """
    return tokens_for_hd_size(*hd_size(width, height, num_crops))


def image_tags(n: int, first: int = 1) -> str:
    """`<|image_{first}|>...<|image_{first+n-1}|>`, the tags of n images numbered from `first`.

    The one numbering rule: the processor needs the tags of one prompt to be 1..N for its N images.
    Training (data.py) encodes every conversation turn as a prompt of its own, with that turn's
    images, so each turn counts from 1 (the recipe's Phi3VDataset). Evaluation and generation put
    the whole conversation into one prompt, so a later turn continues the count
    (`first` = images of the earlier turns + 1).
    """
    return "".join(f"<|image_{k}|>" for k in range(first, first + n))


def user_content(text: str, n_images: int, first: int = 1) -> str:
    """A user message with its images' tags in front (`<|image_1|>...\n` + text), as the recipe does."""
    return f"{image_tags(n_images, first)}\n{text}" if n_images else text


# ----------------------------------------------------------------------------- images


def _describe(image) -> str:
    name = getattr(image, "filename", "") if isinstance(image, Image.Image) else ""
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
    return f"image file {name!r}" if name else "in-memory image"


def load_rgb(image) -> Image.Image:
    """A decoded RGB PIL image from a PIL image (any mode), a path, or encoded bytes.

    Non-RGB modes go through a plain `convert("RGB")` like the reference: alpha is dropped, not
    composited. Unreadable or corrupt files raise ValueError naming the file.
    """
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    elif not isinstance(image, (Image.Image, str, os.PathLike)):
        raise ValueError(f"expected a PIL image, a path or bytes, got {type(image).__name__}")
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        with Image.open(image) as im:
            return im.convert("RGB")  # convert() decodes the whole file
    except _PIL_ERRORS as e:
        raise ValueError(f"cannot read {_describe(image)}: {e}") from e


def _normalisation_table(mean, std) -> np.ndarray:
    """[3, 256] float32: ToTensor (/255) then Normalize for every uint8 value, in torch float32."""
    mean = torch.tensor(mean, dtype=torch.float32)[:, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None]
    # same ops and dtype as torchvision ToTensor + Normalize, so a lookup is bit-identical
    return torch.arange(256, dtype=torch.float32)[None].div(255).sub(mean).div(std).numpy()


class ImageProcessor:
    """Phi3VImageProcessor: PIL images -> HD crops `[N, C+1, 3, 336, 336]` + sizes + token counts."""

    def __init__(self, num_crops: int = 4, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        num_crops = _check_num_crops(num_crops)
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (R, G, B)")
        self.num_crops = num_crops
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self._table = _normalisation_table(self.image_mean, self.image_std)

    def hd_image(self, image) -> np.ndarray:
        """The HD-transformed uint8 image `[H, W, 3]`: resized, white-padded, 336-multiples."""
        img = load_rgb(image)
        width, height = img.size
        try:
            transposed, new_w, new_h, padded_h = _hd_geometry(width, height, self.num_crops)
        except ValueError as e:
            raise ValueError(f"{_describe(image)}: {e}") from None
        if transposed:  # resize in the transposed frame like the reference (Pillow is separable)
            img = img.transpose(Image.Transpose.TRANSPOSE)
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        hd = np.full((padded_h, new_w, 3), 255, dtype=np.uint8)
        top = (padded_h - new_h) // 2  # floor: the extra row of odd padding goes to the bottom
        hd[top:top + new_h] = np.asarray(img)
        return hd.transpose(1, 0, 2) if transposed else hd  # [H, W, 3]

    def preprocess(self, image, out: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, tuple[int, int], int]:
        """One image -> (pixel_values `[C+1, 3, 336, 336]`, (H, W), number of image tokens).

        `out`, if given, is the float32 `[C+1, 3, 336, 336]` tensor to write the crops into.
        """
        hd = self.hd_image(image)
        H, W = hd.shape[:2]
        h, w = H // CROP, W // CROP
        full = np.empty((3, H, W), dtype=np.float32)
        for c in range(3):  # uint8 -> normalised float32 by table lookup
            np.take(self._table[c], hd[..., c], out=full[c])
        full = torch.from_numpy(full)  # [3, H, W]
        if out is None:
            out = torch.empty(self.num_crops + 1, 3, CROP, CROP)
        # global view: bicubic (no antialias) of the normalised padded image, overshoot kept
        out[0] = F.interpolate(full[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
        # [3, h*336, w*336] -> [3, h, 336, w, 336] -> [h, w, 3, 336, 336]: row-major crops
        out[1:1 + h * w].view(h, w, 3, CROP, CROP).copy_(
            full.view(3, h, CROP, w, CROP).permute(1, 3, 0, 2, 4))
        out[1 + h * w:].zero_()  # padding crops are exact zeros
        return out, (H, W), tokens_for_hd_size(W, H)

    def __call__(self, images, out: torch.Tensor | None = None) -> dict:
        """A PIL image (or path) or a list of them -> dict of pixel_values, image_sizes, num_img_tokens.

        `out`, if given, is the float32 `[N, C+1, 3, 336, 336]` tensor the crops are written into
        (and returned as pixel_values), e.g. a slice of a batch's buffer: no copy to batch them."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        shape = (len(images), self.num_crops + 1, 3, CROP, CROP)
        if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32):
            raise ValueError(f"out must be a float32 tensor {list(shape)}, got {out.dtype} {list(out.shape)}")
        pixels = torch.empty(shape) if out is None else out
        sizes, counts = [], []
        for image, out in zip(images, pixels):  # each image writes its own [C+1, 3, 336, 336] slice
            _, size, count = self.preprocess(image, out=out)
            sizes.append(size)
            counts.append(count)
        return {
            "pixel_values": pixels,                                    # [N, C+1, 3, 336, 336]
            "image_sizes": torch.tensor(sizes, dtype=torch.int64),     # [N, 2] (H, W)
            "num_img_tokens": torch.tensor(counts, dtype=torch.int64),  # [N]
        }


# ----------------------------------------------------------------------------- processor


def _token_str(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class Processor:
    """Phi3VProcessor: tokenizer + image processor; turns one prompt (+ images) into model inputs."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor,
                 tokenizer_config: dict | None = None, preprocessor_config: dict | None = None,
                 special_tokens_map: dict | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokenizer_config = dict(tokenizer_config or {})
        self.preprocessor_config = dict(preprocessor_config or {})
        self.special_tokens_map = special_tokens_map
        cfg = self.tokenizer_config
        self.bos_token = _token_str(cfg.get("bos_token", "<s>"))
        self.eos_token = _token_str(cfg.get("eos_token", "<|endoftext|>"))
        self.pad_token = _token_str(cfg.get("pad_token")) or self.eos_token
        for tok in (self.bos_token, self.eos_token, self.pad_token, "<|end|>"):
            if tokenizer.token_to_id(tok) is None:
                raise ValueError(f"tokenizer has no token {tok!r}")
        # LlamaTokenizerFast rebuilds the post-processor from add_bos_token/add_eos_token
        add_bos = cfg.get("add_bos_token") is not False     # absent or null: the defaults
        add_eos = cfg.get("add_eos_token") is True
        bos, eos = self.bos_token, self.eos_token
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        specials = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials)
        self._tokenizer_json = None  # raw file text, written back by save_pretrained

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, num_crops: int | None = None):
        """Load from a local directory or a hub id (tokenizer.json, tokenizer_config.json,
        preprocessor_config.json). `num_crops=None` takes it from preprocessor_config.json."""
        path = Path(path_or_hub_id)
        if not path.is_dir():
            name = str(path_or_hub_id)
            if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
                raise ValueError(f"{name!r} is neither a directory nor a hub id (owner/name)")
            path = hub_snapshot(name, list(_FILES))
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {path}")
        tok_path = path / "tokenizer.json"
        raw = tok_path.read_bytes()
        try:
            tok_text = raw.decode("utf-8")
            tokenizer = Tokenizer.from_str(tok_text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{tok_path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise ValueError(f"{tok_path}: not a valid tokenizers file: {e}") from None

        def fields(name) -> Fields | None:
            f = path / name
            return Fields(read_json(f), str(f)) if f.is_file() else None

        pre = fields("preprocessor_config.json")
        if num_crops is None:
            num_crops = pre.int("num_crops", 4) if pre is not None else 4
        mean, std = CLIP_MEAN, CLIP_STD
        if pre is not None:
            mean, std = pre.numbers("image_mean", CLIP_MEAN), pre.numbers("image_std", CLIP_STD, above=0)
            for key, v in (("image_mean", mean), ("image_std", std)):
                if len(v) != 3:
                    pre.fail(key, f"must have 3 values (R, G, B), got {len(v)}")
        tok_cfg = fields("tokenizer_config.json")
        if tok_cfg is not None:
            for key in ("bos_token", "eos_token", "pad_token"):
                tok = tok_cfg.value(key, None)
                if key not in tok_cfg or (tok is None and key == "pad_token"):
                    continue            # the defaults (pad: the eos token)
                text = _token_str(tok)
                if not isinstance(text, str):
                    tok_cfg.fail(key, f"must be a token string or an AddedToken object with a 'content' string, "
                                      f"got {show(tok)}")
                if tokenizer.token_to_id(text) is None:
                    tok_cfg.fail(key, f"= {text!r} is not a token of {tok_path.name}")
            for key, default in (("add_bos_token", True), ("add_eos_token", False)):
                tok_cfg.boolean(key, default, null=True)
        special = fields("special_tokens_map.json")
        image_processor = ImageProcessor(num_crops=num_crops, image_mean=mean, image_std=std)
        try:
            proc = cls(tokenizer, image_processor, tok_cfg and tok_cfg.obj, pre and pre.obj, special and special.obj)
        except ValueError as e:   # a default special token the tokenizer lacks
            raise ValueError(f"{tok_path}: {e}") from None
        proc._tokenizer_json = tok_text
        return proc

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, preprocessor_config.json (+ special_tokens_map)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # every file written whole or not at all (a kill mid-save never leaves a truncated file)
        if self._tokenizer_json is not None:
            write_text_atomic(out / "tokenizer.json", self._tokenizer_json)
        else:
            write_atomic(out / "tokenizer.json", lambda p: self.tokenizer.save(str(p)))
        ip = self.image_processor
        pre_cfg = {**self.preprocessor_config, "num_crops": ip.num_crops,
                   "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}
        files = {"tokenizer_config.json": self.tokenizer_config, "preprocessor_config.json": pre_cfg,
                 "special_tokens_map.json": self.special_tokens_map}
        for name, obj in files.items():
            if obj:
                write_text_atomic(out / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    # --- token ids -----------------------------------------------------------------------

    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def end_token_id(self) -> int:
        return self.tokenizer.token_to_id("<|end|>")

    # --- text ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens the BOS is prepended like the reference."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (list or 1-D tensor); image placeholders (negative ids) are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes one sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids if i >= 0],
                                     skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Phi-3 chat format: `<|role|>\\n{content}<|end|>\\n` per message, then `<|assistant|>\\n`
        if add_generation_prompt and the last message is not the assistant's. No BOS (the
        tokenizer adds it)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        parts = []
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"each message needs a str 'role' and a str 'content', got {m!r}")
            parts.append(f"<|{m['role']}|>\n{m['content']}<|end|>\n")
        if add_generation_prompt and messages[-1]["role"] != "assistant":
            parts.append("<|assistant|>\n")
        return "".join(parts)

    # --- prompt + images -----------------------------------------------------------------

    def __call__(self, prompt: str, images=None, pixel_values_out: torch.Tensor | None = None) -> dict:
        """One prompt string (+ images) -> input_ids `[1, T]`, attention_mask `[1, T]`, and with
        images pixel_values `[N, C+1, 3, 336, 336]` and image_sizes `[N, 2]`
        (written into `pixel_values_out` if given: ImageProcessor's `out`).

        Without images the prompt is plain text (image tags included). With images, each text
        chunk between `<|image_k|>` tags is tokenized on its own with a BOS, and tag k becomes a
        run of -k of length num_img_tokens[k-1]. The distinct tag ids must be exactly 1..N.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be one str, got {type(prompt).__name__} "
                             "(batch prompts through the collator)")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            ids = torch.tensor([self.tokenizer.encode(prompt).ids], dtype=torch.int64)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        tag_ids = [int(t[len("<|image_"):-len("|>")]) for t in IMAGE_TAG.findall(prompt)]
        distinct = sorted(set(tag_ids))
        if distinct != list(range(1, len(distinct) + 1)):
            raise ValueError(f"image tags must be numbered <|image_1|>..<|image_n|> without gaps, "
                             f"got ids {distinct}")
        if len(distinct) != len(images):
            raise ValueError(f"the prompt has {len(distinct)} distinct image tags but "
                             f"{len(images)} images were given")

        enc = self.image_processor(images, out=pixel_values_out)
        # one encode per chunk (not encode_batch: its thread pool misbehaves in forked workers)
        chunks = [self.tokenizer.encode(c).ids for c in IMAGE_TAG.split(prompt)]
        counts = enc["num_img_tokens"].tolist()
        ids = list(chunks[0])
        for k, chunk in zip(tag_ids, chunks[1:]):
            ids += [-k] * counts[k - 1]
            ids += chunk
        ids = torch.tensor([ids], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}
