"""Everything `train.py --task demo` needs, built in (no downloads, nothing outside the package).

- a tiny Phi-3.5-vision (the real architecture at small sizes, random init with a fixed seed),
  written in the official HF layout so the demo exercises the real loading code;
- a Llama-style tokenizer made here (characters + byte fallback, the real Phi-3 special tokens);
- a video-classification dataset in the converted UCF-101 layout: 8-frame clips of a moving
  shape whose class (shape and colour) is visible in every frame.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from .config import Phi3VConfig
from .jsonfile import write_text_atomic
from .model import Phi3V

CLASSES = ["Ball", "Cube", "Line", "Ring"]
COLORS = {"Ball": (220, 40, 40), "Cube": (40, 90, 220), "Line": (30, 170, 60), "Ring": (230, 190, 20)}
PROMPT = "Classify the video into one of the following classes: " + ", ".join(CLASSES) + "."
FRAMES = 8
# id -> (token, rstrip) of Phi-3's added tokens (same ids and strings as the real tokenizer)
SPECIAL = {32000: ("<|endoftext|>", False), 32001: ("<|assistant|>", True), 32006: ("<|system|>", False),
           32007: ("<|end|>", False), 32010: ("<|user|>", False), 32044: ("<|image|>", True)}
for _i, _k in enumerate(list(range(32002, 32006)) + [32008, 32009] + list(range(32011, 32044))):
    SPECIAL[_k] = (f"<|placeholder{_i + 1}|>", True)


def build_tokenizer() -> tuple[Tokenizer, dict]:
    """A small Llama-style BPE tokenizer: printable ASCII characters plus whole-word pieces for the demo's
    prompt words, other bytes fall back to <0xNN>; normaliser, decoder and BOS post-processor as
    Phi-3's. Returns it + the tokenizer_config dict."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + sorted(set(string.printable) - set(string.whitespace)):
        vocab.setdefault(ch, len(vocab))
    # whole-word pieces for the prompt and class words (so each class name is one token)
    merges = []
    for word in sorted(set(PROMPT.replace(",", " ").replace(".", " ").split())):
        piece = "▁"
        for ch in word:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    while len(vocab) < 32000:                     # keep the real id layout: added tokens start at 32000
        vocab[f"<filler_{len(vocab):05d}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("</s>", special=False, rstrip=True, normalized=False)])
    for i in sorted(SPECIAL):
        t, rstrip = SPECIAL[i]
        tok.add_special_tokens([AddedToken(t, special=True, rstrip=rstrip, normalized=False)])
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "padding_side": "right", "tokenizer_class": "LlamaTokenizer"}
    return tok, config


def demo_config() -> Phi3VConfig:
    return Phi3VConfig.tiny(name_or_path="phi3v-demo-tiny")


def write_base_model(out_dir: str | Path, seed: int = 0, num_crops: int = 1, config: Phi3VConfig | None = None,
                     dtype=None, device: str = "cpu") -> Path:
    """Write a randomly initialised model (default: the demo's tiny one; bench/ writes the real sizes)
    + tokenizer + preprocessor config as an HF-layout directory.

    Everything is written into a temporary folder and moved in with config.json last: a kill
    midway never leaves a folder that has config.json (what train.py checks) but lacks a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-demo-model-", dir=out))
    try:
        model = Phi3V.from_config(config or demo_config(), seed=seed, device=device)
        (model.to(dtype) if dtype is not None else model).save_pretrained(tmp)
        del model
        tok, tok_cfg = build_tokenizer()
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Phi3VImageProcessor",
            "num_crops": num_crops, "num_img_tokens": 144, "processor_class": "Phi3VProcessor"}, indent=2))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def draw_frame(cls: str, k: int, rng: random.Random, size=(96, 72), start=(0, 0), noise=12) -> Image.Image:
    """One frame: the class's shape/colour at a position that moves with the frame index k."""
    w, h = size
    bg = tuple(int(200 + rng.uniform(-noise, noise)) for _ in range(3))
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    x = (start[0] + 8 * k) % (w - 24) + 4
    y = (start[1] + 5 * k) % (h - 24) + 4
    c = COLORS[cls]
    if cls == "Ball":
        d.ellipse([x, y, x + 20, y + 20], fill=c)
    elif cls == "Cube":
        d.rectangle([x, y, x + 20, y + 20], fill=c)
    elif cls == "Line":
        d.rectangle([x, y + 7, x + 22, y + 13], fill=c)
    else:
        d.ellipse([x, y, x + 20, y + 20], outline=c, width=4)
    return im


def write_dataset(out_dir: str | Path, n_train: int = 96, n_val: int = 24, n_test: int = 24, seed: int = 0) -> Path:
    """`out_dir/images/{split}/{Class}/v_{Class}_gXX_cYY.{k}.jpg` + `ucf101_{split}.jsonl` (recipe layout).

    The jsonl files are written after all images, each whole (temporary file + rename), the train
    split last: a folder with ucf101_train.jsonl (what train.py checks) is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counter = 0
    texts = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = []
        for i in range(n):
            cls = CLASSES[i % len(CLASSES)]
            stem = f"v_{cls}_g{i // len(CLASSES) + 1:02d}_c01"
            folder = out / "images" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            start = (rng.randrange(60), rng.randrange(40))
            paths = []
            for k in range(FRAMES):
                draw_frame(cls, k, rng, start=start).save(folder / f"{stem}.{k}.jpg")
                paths.append(f"{split}/{cls}/{stem}.{k}.jpg")
            rec = {"id": f"{split}-{counter:010d}", "source": "demo",
                   "conversations": [{"images": paths, "user": PROMPT, "assistant": cls}]}
            lines.append(json.dumps(rec))
            counter += 1
        texts[split] = "\n".join(lines) + "\n"
    for split in ("test", "val", "train"):
        write_text_atomic(out / f"ucf101_{split}.jsonl", texts[split])
    return out
