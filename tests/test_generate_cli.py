"""`python -m phi3v.generate`: base model + adapter from the command line equals the in-process answer."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from phi3v import Phi3V, Processor, apply_lora, save_adapter
from phi3v.demo import PROMPT
from phi3v.generate import answer

REPO = Path(__file__).resolve().parents[1]


def test_generate_cli_with_adapter(demo_dir, tmp_path):
    base = demo_dir / "model"
    rec = json.loads((demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()[0])
    frames = [demo_dir / "data" / "images" / p for p in rec["conversations"][0]["images"]]
    model = Phi3V.from_pretrained(base)
    torch.manual_seed(0)
    apply_lora(model, rank=4, alpha=8, init="gaussian")
    with torch.no_grad():                       # a non-trivial adapter (B is zero at init)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    proc = Processor.from_pretrained(base)
    expected = answer(model.eval(), proc, PROMPT, [str(f) for f in frames], max_new_tokens=6)
    plain = answer(Phi3V.from_pretrained(base), proc, PROMPT, [str(f) for f in frames], max_new_tokens=6)
    assert expected != plain                    # the adapter changes the answer, so the CLI must load it
    cmd = [sys.executable, "-m", "phi3v.generate", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
           "--prompt", PROMPT, "--max_new_tokens", "6"] + [a for f in frames for a in ("--image", str(f))]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_generate_cli_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "phi3v.generate", "--model", str(tmp_path / "none"), "--prompt", "x"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "neither a checkpoint directory" in out.stderr
