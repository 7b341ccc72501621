"""Image-processor throughput: images/s for one 1280x960 image (a decoded PIL image) per call.

    python bench/processor.py                       # num_crops 4 and 16, one thread
    python bench/processor.py --num_crops 16 --iters 100 --out bench/results/processor_cpu.json
"""
import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from phi3v.processor import ImageProcessor


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured RGB test image (smooth gradients plus noise, so resizing does real work)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def bench(image: Image.Image, num_crops: int, iters: int, warmup: int) -> dict:
    ip = ImageProcessor(num_crops=num_crops)
    for _ in range(warmup):
        ip(image)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = ip(image)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"num_crops": num_crops, "image_sizes": out["image_sizes"][0].tolist(),
            "num_img_tokens": int(out["num_img_tokens"][0]), "iters": iters,
            "median_ms": 1e3 * median, "images_per_s": 1 / median,
            "mean_images_per_s": iters / sum(times)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_crops", type=int, nargs="+", default=[4, 16])
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=960)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a data-loader worker uses 1)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    image = make_image(args.width, args.height)
    results = []
    print(f"image {args.width}x{args.height}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}")
    for n in args.num_crops:
        r = bench(image, n, args.iters, args.warmup)
        results.append(r)
        print(f"num_crops {n:2d}: HD {r['image_sizes'][1]}x{r['image_sizes'][0]} (WxH), "
              f"{r['num_img_tokens']} tokens, {r['median_ms']:.1f} ms/image, "
              f"{r['images_per_s']:.1f} images/s (median; mean {r['mean_images_per_s']:.1f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": "processor", "width": args.width, "height": args.height,
                       "threads": args.threads, "torch": torch.__version__, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
