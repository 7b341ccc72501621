"""Evaluation by generation, as the recipe does (RECIPE §2.9): greedy decoding, then exact match
(strip, strip '.', lower) and, for DocVQA, ANLS with threshold 0.5 (best over reference answers).

One engine answers records for both the evaluation during training (`evaluate`) and
`python -m phi3v.generate --data` (`plan_prompts` -> `length_batches` -> `answer_batches`):
  * the batches are a fixed function of the whole input: records sorted by prompt length (longest
    first, ties in input order) and cut into batches, so every record is answered in the same
    batch, with the same padding, however many ranks share the work or where a run was resumed;
  * rank r answers batches r, r + W, ...; after each round every rank's results are gathered
    and put back in input order by their index;
  * images are decoded and preprocessed by DataLoader workers while the model generates, straight
    into one pixel buffer per batch (PromptBatches), and a batch stops as soon as each of its rows
    has finished (Phi3V.generate).
Each record gets one answer, for its last turn, with the earlier turns as history (`eval_inputs`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist
from .data import load_image
from .index import image_file, image_tokens
from .jsonfile import write_text_atomic
from .config import CROP
from .processor import IMAGE_TAG, Processor, user_content
from .schema import jsonl_lines, parse_line, validate_record


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


def is_correct(pred: str, answers: list[str]) -> bool:
    """The recipe's accuracy: normalised exact match against any reference answer."""
    return any(normalize(pred) == normalize(a) for a in answers)


# ------------------------------------------------------------------------------------------------
# records -> prompts


def read_records(path: str | Path, *, unanswered: bool = False, skip_bad: bool = False,
                 max_samples: int | None = None) -> tuple[list[tuple[str, dict]], list[str]]:
    """(where, record) of each valid line of a jsonl file, where = "file:line", and the
    "file:line: reason" of each line skipped with `skip_bad` (else the first bad line raises
    ValueError). `unanswered`: the last turn may lack its answer (schema.validate_record)."""
    out, skipped = [], []
    for line_no, raw in jsonl_lines(path):
        where = f"{path}:{line_no}"
        try:
            rec = parse_line(raw, where)
            validate_record(rec, where, unanswered=unanswered)
            reference_answers(rec, where)
        except ValueError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        out.append((where, rec))
        if max_samples and len(out) >= max_samples:
            break
    return out, skipped


def load_eval_records(path: str | Path, max_samples: int | None = None) -> list[tuple[str, dict]]:
    """The evaluation split (every record answered); ValueError on the first bad line or if empty."""
    out, _ = read_records(path, max_samples=max_samples)
    if not out:
        raise ValueError(f"{path}: no evaluation records")
    return out


def reference_answers(rec: dict, where: str) -> list[str] | None:
    """What a prediction is scored against: the record's "answers" (DocVQA: every annotator's) or
    else its last answer; None for an unanswered record (a test split)."""
    if "answers" in rec:
        a = rec["answers"]
        if not (isinstance(a, list) and a and all(isinstance(x, str) for x in a)):
            raise ValueError(f"{where}: field 'answers': expected a non-empty list of strings, got {a!r:.80}")
        return list(a)
    last = rec["conversations"][-1].get("assistant")
    return [last] if isinstance(last, str) and last.strip() else None


def conversation_prompt(proc: Processor, rec: dict) -> tuple[str, list[str]]:
    """The prompt of a whole conversation up to its last user turn (earlier answers as history) and
    the image paths of all its turns; image numbers continue across turns (processor.image_tags)."""
    msgs, images = [], []
    turns = rec["conversations"]
    for t, turn in enumerate(turns):
        msgs.append({"role": "user", "content": user_content(turn["user"], len(turn["images"]), first=len(images) + 1)})
        images += turn["images"]
        if t < len(turns) - 1:
            msgs.append({"role": "assistant", "content": turn["assistant"]})
    return proc.apply_chat_template(msgs, add_generation_prompt=True), images


def eval_inputs(proc: Processor, rec: dict, images_dir: Path, where: str,
                pixel_values_out: torch.Tensor | None = None) -> dict:
    """The processor's encoding of `conversation_prompt` with the images decoded (their crops
    written into `pixel_values_out` if given), plus "id" and "answers" (`reference_answers`)."""
    prompt, rels = conversation_prompt(proc, rec)
    images = [load_image(image_file(images_dir, rel, where), f"{where}: image {rel!r}") for rel in rels]
    try:
        enc = proc(prompt, images or None, pixel_values_out=pixel_values_out if images else None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    enc["answers"] = reference_answers(rec, where)
    enc["id"] = rec["id"]
    return enc


def prompt_length(proc: Processor, rec: dict, images_dir: Path, where: str) -> int:
    """The exact token count of `eval_inputs(...)["input_ids"]`, from the image headers (no pixel
    decoding) and the tokenizer, counted the way the processor builds the prompt."""
    prompt, rels = conversation_prompt(proc, rec)
    if not rels:
        return len(proc.encode(prompt, add_special_tokens=True))
    try:
        counts = [image_tokens(images_dir, rel, proc.num_crops) for rel in rels]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    # every chunk between tags is tokenized with its own BOS; tag k is image k's run of placeholders
    n = sum(len(proc.encode(chunk, add_special_tokens=True)) for chunk in IMAGE_TAG.split(prompt))
    tags = [int(t[len("<|image_"):-len("|>")]) for t in IMAGE_TAG.findall(prompt)]
    if sorted(set(tags)) != list(range(1, len(counts) + 1)):
        raise ValueError(f"{where}: the prompt's image tags {sorted(set(tags))} do not number its "
                         f"{len(counts)} images (an answer of an earlier turn holds an image tag?)")
    return n + sum(counts[k - 1] for k in tags)


@dataclass
class Prompt:
    where: str          # "file:line" for error messages
    rec: dict
    length: int         # prompt tokens (prompt_length)


def plan_prompts(proc: Processor, records: list[tuple[str, dict]], images_dir: Path, *, max_length: int | None = None,
                 limit: str = "", skip_bad: bool = False, progress=None) -> tuple[list[Prompt], list[str]]:
    """Every record's prompt length, before anything is decoded, so missing images and prompts
    over `max_length` tokens (`limit` says why that is the limit) are found up front. Returns the
    prompts and, with `skip_bad`, the "file:line: reason" of each record left out (else it raises)."""
    prompts, skipped = [], []
    for where, rec in (progress(records) if progress else records):
        try:
            n = prompt_length(proc, rec, images_dir, where)
            if max_length is not None and n > max_length:
                raise ValueError(f"{where}: the prompt has {n} tokens, more than the {max_length} the model can "
                                 f"take{f' ({limit})' if limit else ''}")
        except ValueError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        prompts.append(Prompt(where, rec, n))
    return prompts, skipped


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, longest first (the memory peak comes first; ties in input order),
    cut into batches: little padding, and the same batches whatever the world size or resume point."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------
# prompts -> answers


def n_images(rec: dict) -> int:
    return sum(len(turn["images"]) for turn in rec["conversations"])


def left_pad(batch: list[dict], pad_id: int, pixel_values: torch.Tensor | None = None) -> dict:
    """Encodings -> one left-padded batch; pixel_values concatenated unless given (already batched)."""
    t = max(e["input_ids"].shape[1] for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, e in enumerate(batch):
        n = e["input_ids"].shape[1]
        ids[i, t - n:], mask[i, t - n:] = e["input_ids"][0], 1
    pv = [e["pixel_values"] for e in batch if "pixel_values" in e]
    sz = [e["image_sizes"] for e in batch if "image_sizes" in e]
    if pixel_values is None and pv:
        pixel_values = torch.cat(pv)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "image_sizes": torch.cat(sz) if sz else None}


class PromptBatches(torch.utils.data.Dataset):
    """Item k = batch k of `batches` (lists of prompt indices), built where the DataLoader runs it (a
    worker process when there are any): every image decoded and preprocessed straight into one pixel
    buffer of the batch (in shared memory in a worker), so nothing is copied to batch the samples or
    to send the batch (pixel values are megabytes per image, and fresh memory costs page faults), and
    the prompts left-padded. Returns {"inputs": model inputs or None, "rows": [(index, id, answers)],
    "skipped": [(index, reason)]}: with `skip_bad` a record that fails is left out and listed."""

    def __init__(self, proc: Processor, prompts: list[Prompt], images_dir: Path, batches: list[list[int]],
                 skip_bad: bool = False):
        self.proc, self.prompts, self.images_dir = proc, prompts, Path(images_dir)
        self.batches, self.skip_bad = batches, skip_bad

    def __len__(self) -> int:
        return len(self.batches)

    def pixel_buffer(self, n: int) -> torch.Tensor | None:
        """float32 [n, C+1, 3, 336, 336], in shared memory inside a DataLoader worker (as torch's
        default_collate allocates its output there, so sending it to the main process copies nothing)."""
        if n == 0:
            return None
        shape = (n, self.proc.num_crops + 1, 3, CROP, CROP)
        if torch.utils.data.get_worker_info() is None:
            return torch.empty(shape)
        return torch.empty(0).set_(torch.UntypedStorage._new_shared(math.prod(shape) * 4), 0, shape)

    def __getitem__(self, k: int) -> dict:
        batch = self.batches[k]
        counts = [n_images(self.prompts[i].rec) for i in batch]
        pixels = self.pixel_buffer(sum(counts))
        encs, rows, skipped, kept = [], [], [], []
        start = 0
        for i, n in zip(batch, counts):
            p = self.prompts[i]
            try:
                enc = eval_inputs(self.proc, p.rec, self.images_dir, p.where,
                                  pixels[start:start + n] if n else None)
                if enc["input_ids"].shape[1] != p.length:
                    raise ValueError(f"{p.where}: the prompt has {enc['input_ids'].shape[1]} tokens, {p.length} "
                                     "were counted from the image headers (image changed on disk?)")
            except ValueError as e:
                if not self.skip_bad:
                    raise
                skipped.append((i, str(e)))
            else:
                encs.append(enc)
                rows.append((i, enc["id"], enc["answers"]))
                kept += range(start, start + n)
            start += n
        if not encs:
            return {"inputs": None, "rows": [], "skipped": skipped}
        if pixels is not None and len(kept) < len(pixels):       # a record with images was skipped
            pixels = pixels[kept] if kept else None
        return {"inputs": left_pad(encs, self.proc.pad_token_id, pixels), "rows": rows, "skipped": skipped}


def _as_is(batch: dict) -> dict:
    return batch        # PromptBatches' items are whole batches already


def answer_batches(model, proc: Processor, dataset: PromptBatches, *, max_new_tokens: int = 64, num_workers: int = 0):
    """Greedy answers to every batch of `dataset`. Rank r answers batches r, r + W, ...; yields after
    each round of W batches every rank's results of that round, on every rank: {"index", "id",
    "prediction", "answers"} per answered record, {"index", "skipped"} per record left out
    (PromptBatches with skip_bad). Collective under torchrun: every rank iterates to the end."""
    world, rank = dist.world_size(), dist.rank()
    mine = list(range(rank, len(dataset), world))
    # own generator: iter(loader) draws a seed, which must not advance the global RNG (train.py's dropout)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=mine, collate_fn=_as_is, num_workers=num_workers,
        pin_memory=model.device.type == "cuda", prefetch_factor=2 if num_workers else None,
        generator=torch.Generator())
    batch_iter = iter(loader) if mine else iter(())
    was_training = model.training
    model.eval()
    try:
        for _ in range(math.ceil(len(dataset) / world)):
            out = []
            b = next(batch_iter, None)       # None: this rank has no batch in the last round
            if b is not None and b["inputs"] is not None:
                with torch.no_grad():
                    new = model.generate(**b["inputs"], max_new_tokens=max_new_tokens)
                for (i, rid, answers), ids in zip(b["rows"], new.cpu()):
                    out.append({"index": i, "id": rid, "prediction": proc.decode(ids, skip_special_tokens=True),
                                "answers": answers})
            if b is not None:
                out += [{"index": i, "skipped": why} for i, why in b["skipped"]]
            yield [r for part in dist.all_gather_object(out) for r in part]
    finally:
        model.train(was_training)


def prediction_line(result: dict, with_anls: bool = False) -> dict:
    """One line of a predictions file: {"id", "prediction", "answers", "correct"} (+ "anls");
    answers, correct (and anls) are null for an unanswered record."""
    answers = result["answers"]
    line = {"id": result["id"], "prediction": result["prediction"], "answers": answers,
            "correct": is_correct(result["prediction"], answers) if answers is not None else None}
    if with_anls:
        line["anls"] = anls(result["prediction"], answers) if answers is not None else None
    return line


def dump_line(line: dict) -> str:
    """A predictions line as written (UTF-8 JSON + newline); the one serialisation, so a resumed
    file and an uninterrupted one have the same bytes."""
    return json.dumps(line, ensure_ascii=False) + "\n"


def write_predictions(out_dir: str | Path, when: str, predictions: list[dict]) -> Path:
    """`out_dir/predictions/<when>.jsonl`, one `prediction_line` per record in input order, written
    atomically. `when`: "before", "step-N", "after", "eval_only". Returns the path."""
    path = Path(out_dir) / "predictions" / f"{when}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(dump_line(p) for p in predictions))
    return path


def score(results: list[dict], with_anls: bool = False) -> dict:
    """accuracy (0..1) by normalised exact match against any reference; ANLS for DocVQA. Results
    without answers (answers None: a test split) are not scored; n counts the scored ones."""
    scored = [r for r in results if r["answers"] is not None]
    n = len(scored)
    acc = sum(is_correct(r["prediction"], r["answers"]) for r in scored)
    out = {"accuracy": acc / n if n else 0.0, "n": n}
    if with_anls:
        out["anls"] = sum(anls(r["prediction"], r["answers"]) for r in scored) / n if n else 0.0
    return out


def evaluate(model, proc: Processor, records: list[tuple[str, dict]], images_dir: Path, *, batch_size: int = 1,
             max_new_tokens: int = 64, with_anls: bool = False, num_workers: int = 0, progress=None) -> dict:
    """Greedy answers to every record (`answer_batches`: ranks share the batches), scored, on every
    rank: {"accuracy", "n", ["anls"], "examples": the first 5 predictions, "predictions": every
    record's `prediction_line` in input order (for `write_predictions`)}. `progress`: a tqdm-like
    factory, called with total= and unit=."""
    prompts, _ = plan_prompts(proc, records, images_dir)
    batches = length_batches([p.length for p in prompts], batch_size)
    results = [None] * len(prompts)
    bar = progress(total=len(prompts), unit="sample") if progress else None
    for done in answer_batches(model, proc, PromptBatches(proc, prompts, images_dir, batches),
                               max_new_tokens=max_new_tokens, num_workers=num_workers):
        for r in done:
            results[r["index"]] = r          # input order, whichever rank answered it
        if bar is not None:
            bar.update(len(done))
    if bar is not None:
        bar.close()
    preds = [prediction_line(r, with_anls) for r in results]
    return {**score(preds, with_anls), "examples": preds[:5], "predictions": preds}
