"""Evaluation by generation, as the recipe does (RECIPE §2.9): greedy decoding, then exact match
(strip, strip '.', lower) and, for DocVQA, ANLS with threshold 0.5 (best over reference answers)."""
from __future__ import annotations

from pathlib import Path

import torch

from .schema import iter_jsonl, validate_record

from . import dist
from .data import load_image
from .processor import Processor, user_content


def normalize(s: str) -> str:
    return s.strip().strip(".").lower()


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, answers: list[str], tau: float = 0.5) -> float:
    """The recipe's ANLS: prediction stripped of spaces and '.', references as-is, no lowercasing."""
    p = pred.strip().strip(".")
    if not p:
        return 0.0
    best = 0.0
    for a in answers:
        nl = levenshtein(a, p) / max(len(a), len(p), 1)
        best = max(best, 1 - nl if nl < tau else 0.0)
    return best


def load_eval_records(path: str | Path, max_samples: int | None = None) -> list[tuple[str, dict]]:
    out = []
    for line_no, rec in iter_jsonl(path):
        where = f"{path}:{line_no}"
        validate_record(rec, where)
        out.append((where, rec))
        if max_samples and len(out) >= max_samples:
            break
    if not out:
        raise ValueError(f"{path}: no evaluation records")
    return out


def eval_inputs(proc: Processor, rec: dict, images_dir: Path, where: str) -> dict:
    """One conversation up to its last user turn (earlier answers included), images of all turns
    numbered in order; the reference answers are the last turn's (or the record's "answers")."""
    msgs, images, n = [], [], 0
    turns = rec["conversations"]
    for t, turn in enumerate(turns):
        # one prompt for the whole conversation: image numbers continue across turns (image_tags)
        msgs.append({"role": "user", "content": user_content(turn["user"], len(turn["images"]), first=n + 1)})
        n += len(turn["images"])
        if t < len(turns) - 1:
            msgs.append({"role": "assistant", "content": turn["assistant"]})
        images += [load_image(images_dir / rel, f"{where}: image {rel!r}") for rel in turn["images"]]
    enc = proc(proc.apply_chat_template(msgs, add_generation_prompt=True), images or None)
    enc["answers"] = list(rec.get("answers") or [turns[-1]["assistant"]])
    enc["id"] = rec["id"]
    return enc


def left_pad(batch: list[dict], pad_id: int) -> dict:
    t = max(e["input_ids"].shape[1] for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, e in enumerate(batch):
        n = e["input_ids"].shape[1]
        ids[i, t - n:], mask[i, t - n:] = e["input_ids"][0], 1
    pv = [e["pixel_values"] for e in batch if "pixel_values" in e]
    sz = [e["image_sizes"] for e in batch if "image_sizes" in e]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pv) if pv else None,
            "image_sizes": torch.cat(sz) if sz else None}


@torch.no_grad()
def generate_answers(model, proc: Processor, records: list[tuple[str, dict]], images_dir: Path,
                     batch_size: int = 1, max_new_tokens: int = 64, progress=None) -> list[dict]:
    """Greedy answers for records -> [{"id", "prediction", "answers"}], batches left-padded."""
    was_training = model.training
    model.eval()
    out = []
    steps = range(0, len(records), batch_size)
    for s in (progress(steps) if progress else steps):
        encs = [eval_inputs(proc, rec, images_dir, where) for where, rec in records[s:s + batch_size]]
        batch = left_pad(encs, proc.pad_token_id)
        new = model.generate(**batch, max_new_tokens=max_new_tokens)
        for e, ids in zip(encs, new):
            out.append({"id": e["id"], "prediction": proc.decode(ids, skip_special_tokens=True),
                        "answers": e["answers"]})
    model.train(was_training)
    return out


def score(results: list[dict], with_anls: bool = False) -> dict:
    """accuracy (0..1) by normalised exact match against any reference; ANLS for DocVQA."""
    n = len(results)
    acc = sum(any(normalize(r["prediction"]) == normalize(a) for a in r["answers"]) for r in results)
    out = {"accuracy": acc / n if n else 0.0, "n": n}
    if with_anls:
        out["anls"] = sum(anls(r["prediction"], r["answers"]) for r in results) / n if n else 0.0
    return out


def evaluate(model, proc: Processor, records: list[tuple[str, dict]], images_dir: Path, *, batch_size: int = 1,
             max_new_tokens: int = 64, with_anls: bool = False, progress=None) -> dict:
    """Greedy answers on this rank's share of `records` (rank r takes every world-th record), gathered
    to every rank and scored: {"accuracy", "n", ["anls"], "examples": the first 5 results}."""
    mine = records[dist.rank()::dist.world_size()]
    res = generate_answers(model, proc, mine, images_dir, batch_size, max_new_tokens, progress)
    if dist.world_size() > 1:
        parts = [None] * dist.world_size()
        torch.distributed.all_gather_object(parts, res)
        res = [r for part in parts for r in part]
    return {**score(res, with_anls), "examples": res[:5]}
