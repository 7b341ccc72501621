"""Inference from the command line:

    python -m phi3v.generate --model microsoft/Phi-3.5-vision-instruct --image a.jpg --prompt "What is shown?"
    python -m phi3v.generate --model base_dir --adapter output/ucf101 --image f0.jpg --image f1.jpg --prompt "..."

Each --image becomes <|image_k|> in front of the prompt (unless the prompt already holds the tags);
the answer is printed to stdout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import cli
from .lora import load_adapter, merge_lora
from .model import Phi3V
from .processor import IMAGE_TAG, Processor, user_content


def build_prompt(proc: Processor, prompt: str, n_images: int, system: str | None = None) -> str:
    """The chat prompt for one user turn; image tags are prepended unless the text has its own."""
    if not IMAGE_TAG.search(prompt):
        prompt = user_content(prompt, n_images)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True)


def answer(model: Phi3V, proc: Processor, prompt: str, images=(), max_new_tokens: int = 256,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, system: str | None = None) -> str:
    """Generate the assistant's reply to one prompt (+ images: PIL images or paths)."""
    enc = proc(build_prompt(proc, prompt, len(images), system), list(images) or None)
    new = model.generate(enc["input_ids"], pixel_values=enc.get("pixel_values"), image_sizes=enc.get("image_sizes"),
                         max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    return proc.decode(new[0], skip_special_tokens=True).strip()


def parse_device(name: str) -> torch.device:
    """`--device` as a torch.device that this machine has; ValueError saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name ({e})") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: there are only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available here (use --device cpu)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return device


def main(argv=None) -> int:
    """The command line; errors are exceptions (the __main__ block turns them into one line)."""
    p = cli.ArgumentParser(prog="phi3v.generate",
                           description="Generate an answer with Phi-3.5-vision (optionally + a LoRA adapter)")
    p.add_argument("--model", required=True, help="HF-layout directory or hub id")
    p.add_argument("--adapter", help="peft adapter directory (e.g. a train.py output_dir)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several / video frames)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", help="optional system message")
    p.add_argument("--num_crops", type=cli.positive_int, help="HD crops per image (default: preprocessor_config.json)")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=256)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=cli.positive_float, default=None, help="with --do_sample (default 1.0)")
    p.add_argument("--top_p", type=cli.probability, default=None,
                   help="nucleus sampling mass, in (0, 1], with --do_sample (default 1.0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    # flags that would be silently ignored are refused, saying why and what to use instead
    sampling = [f"--{k}" for k in ("temperature", "top_p") if getattr(a, k) is not None]
    if sampling and not a.do_sample:
        p.error(f"{' and '.join(sampling)}: only used when sampling; add --do_sample (without it decoding is greedy "
                f"and ignores {'them' if len(sampling) > 1 else 'it'})")
    if a.num_crops is not None and not a.image:
        p.error("--num_crops only applies to images; add --image FILE or drop --num_crops")
    a.temperature = 1.0 if a.temperature is None else a.temperature
    a.top_p = 1.0 if a.top_p is None else a.top_p
    try:
        device = parse_device(a.device)
    except ValueError as e:
        p.error(str(e))
    for image in a.image:
        if not Path(image).is_file():
            p.error(f"--image {image}: " + ("not a file" if Path(image).exists() else "no such file"))
    if a.adapter and not Path(a.adapter).is_dir():
        p.error(f"--adapter {a.adapter}: no such directory")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = Phi3V.from_pretrained(a.model, dtype=dtype, device=device)
    tok_dir = a.model
    if a.adapter:
        load_adapter(model, a.adapter)
        merge_lora(model)
        if (Path(a.adapter) / "tokenizer.json").exists():
            tok_dir = a.adapter
    proc = Processor.from_pretrained(tok_dir, num_crops=a.num_crops)
    print(answer(model, proc, a.prompt, a.image, a.max_new_tokens, a.do_sample, a.temperature, a.top_p, a.system))
    return 0


if __name__ == "__main__":
    with cli.errors("phi3v.generate"):
        sys.exit(main())
