"""Inference from the command line: one prompt, or every record of a dataset.

    python -m phi3v.generate --model microsoft/Phi-3.5-vision-instruct --image a.jpg --prompt "What is shown?"
    python -m phi3v.generate --model base_dir --adapter output/ucf101 --image f0.jpg --image f1.jpg --prompt "..."
    python -m phi3v.generate --model base_dir --adapter output/docvqa --data docvqa_val.jsonl --out preds.jsonl \\
        [--batch_size 8] [--num_workers N] [--format docvqa] [--skip_bad_records]
    torchrun --nproc_per_node=4 -m phi3v.generate ... --data FILE.jsonl --out preds.jsonl

With --prompt each --image becomes <|image_k|> in front of the prompt (unless the prompt already
holds the tags); the answer is printed to stdout.

With --data every record of a jsonl in our format is answered as the evaluation does
(phi3v.evaluate: the last turn, earlier turns as history, greedy), in length-sorted batches, and
--out gets one line per record in input order: {"id", "prediction", "answers", "correct"} (+ "anls";
answers/correct/anls are null for a record without an answer, e.g. a test split). Lines are
appended as batches finish; a killed run continues where it stopped (ids already in --out are
kept, a batch only partly there is answered again whole, so the finished file has the bytes of an
uninterrupted run's), and the finished file is rewritten in input order. Where records carry
answers the evaluation's scores are printed and written to <out stem>.metrics.json; --format
docvqa also writes <out stem>.submission.json, the official [{"questionId": int, "answer": str}].
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from . import cli, dist, hf
from .config import Phi3VConfig
from .evaluate import (PromptBatches, answer_batches, dump_line, length_batches, plan_prompts, prediction_line,
                       read_records, reference_answers, score)
from .jsonfile import write_text_atomic
from .lora import load_adapter, merge_lora
from .model import Phi3V
from .processor import IMAGE_TAG, Processor, user_content
from .schema import parse_line


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


def load_processor(a) -> Processor:
    """The processor of --model, or of --adapter when train.py saved its tokenizer there."""
    tok_dir = a.adapter if a.adapter and (Path(a.adapter) / "tokenizer.json").exists() else a.model
    return Processor.from_pretrained(tok_dir, num_crops=a.num_crops)


def load_model(a, device: torch.device) -> Phi3V:
    """--model in --dtype on `device`, with --adapter merged in."""
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = Phi3V.from_pretrained(a.model, dtype=dtype, device=device)
    if a.adapter:
        load_adapter(model, a.adapter)
        merge_lora(model)
    return model


# ------------------------------------------------------------------------------------------------
# --data: a whole dataset


def sidecar(out: Path, what: str) -> Path:
    """`preds.jsonl` -> `preds.<what>.json` (the metrics and submission files beside --out)."""
    stem = out.stem if out.suffix == ".jsonl" else out.name
    return out.with_name(f"{stem}.{what}.json")


def question_id(rec: dict, where: str) -> int:
    """A DocVQA record's questionId: its "questionId" field, else its id (convert.docvqa writes the
    official json's questionId as the id)."""
    q = rec.get("questionId", rec["id"])
    if isinstance(q, bool) or not (isinstance(q, int) or (isinstance(q, str) and q.isascii() and q.isdigit())):
        raise ValueError(f"{where}: --format docvqa needs the record's DocVQA questionId, an integer id (as "
                         f"convert.docvqa writes it from the official json) or a 'questionId' field; got "
                         f"{'questionId' if 'questionId' in rec else 'id'} {q!r}")
    return int(q)


def check_records(records: list[tuple[str, dict]], docvqa: bool, skip_bad: bool):
    """Unique ids (--out is matched to the records by id) and, for --format docvqa, a questionId
    each. Returns the records that pass and the "file:line: reason" of those skipped (skip_bad)."""
    first, kept, skipped = {}, [], []
    for where, rec in records:
        try:
            if rec["id"] in first:
                raise ValueError(f"{where}: id {rec['id']!r} repeats the one of {first[rec['id']]} (predictions "
                                 "are matched to records by id)")
            if docvqa:
                question_id(rec, where)
        except ValueError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        first[rec["id"]] = where
        kept.append((where, rec))
    return kept, skipped


def read_answered(out: Path, known: set[str]) -> dict[str, str]:
    """id -> prediction of every complete line of an earlier run's --out. A last line without its
    newline (cut by a kill) is ignored; any other line that is not a prediction, or an id that
    `known` (the records of --data) lacks, is an error: --out would be another file."""
    if not out.exists():
        return {}
    raw = out.read_bytes().split(b"\n")
    done = {}
    for n, line in enumerate(raw[:-1], 1):         # raw[-1]: after the last newline, cut or empty
        if not line.strip():
            continue
        where = f"{out}:{n}"
        obj = parse_line(line, where)
        if not (isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("prediction"), str)):
            raise ValueError(f"{where}: not a predictions line (a JSON object with string \"id\" and \"prediction\"); "
                             "--out must be a file written by this command, or a new one")
        if obj["id"] not in known:
            raise ValueError(f"{where}: id {obj['id']!r} is not a record of --data (a predictions file of another "
                             "dataset?); choose another --out")
        done[obj["id"]] = obj["prediction"]
    return done


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds exactly it (a finished file stays
    untouched, mtime included)."""
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    write_text_atomic(path, text)
    return True


def answer_dataset(a, device: torch.device) -> None:
    """--data: answer every record into --out (resumable, sharded over torchrun's ranks), then
    the scores, and the DocVQA submission with --format docvqa. Rank 0 writes and prints."""
    main = dist.is_main()
    log = (lambda *x: print(*x, flush=True)) if main else (lambda *x: None)
    bar = None
    if main and a.tqdm:
        from tqdm import tqdm as bar
    data, out = Path(a.data), Path(a.out)
    images_dir = Path(a.images_dir) if a.images_dir else data.parent / "images"
    proc = load_processor(a)
    positions = Phi3VConfig.from_json(hf.local_dir(a.model, ["config.json"])).max_position_embeddings
    if a.max_new_tokens >= positions:
        raise ValueError(f"--max_new_tokens {a.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{positions} positions")

    # every rank reads and plans the same records (so every rank fails alike on bad input)
    records, skipped = read_records(data, unanswered=True, skip_bad=a.skip_bad_records)
    known = {rec["id"] for _, rec in records}
    records, bad = check_records(records, a.format == "docvqa", a.skip_bad_records)
    prompts, bad2 = plan_prompts(proc, records, images_dir, max_length=positions - a.max_new_tokens,
                                 limit=f"{positions} positions - --max_new_tokens {a.max_new_tokens}",
                                 skip_bad=a.skip_bad_records,
                                 progress=bar and (lambda it: bar(it, desc="reading", unit="record", leave=False)))
    skipped += bad + bad2
    if skipped:
        log(f"skipped {len(skipped)} bad record(s) (--skip_bad_records):")
        for s in skipped:
            log(f"  {s}")
    if not prompts:
        raise ValueError(f"{data}: no records to answer" + (f" ({len(skipped)} skipped as bad)" if skipped else ""))
    ids = [p.rec["id"] for p in prompts]
    batches = length_batches([p.length for p in prompts], a.batch_size)
    with_anls = a.format == "docvqa" or all(p.rec["source"] == "docvqa" for p in prompts)

    answers = [reference_answers(p.rec, p.where) for p in prompts]

    def line(i: int, prediction: str) -> str:
        """Record i's line; answers and scores come from --data as it is now (only predictions are kept)."""
        return dump_line(prediction_line({"id": ids[i], "prediction": prediction, "answers": answers[i]}, with_anls))

    # rank 0 reads what an earlier run wrote and decides which batches are left; every rank gets that
    state = None
    if main:
        try:
            done = read_answered(out, known)
            state = {"todo": [k for k, b in enumerate(batches) if not all(ids[i] in done for i in b)]}
        except ValueError as e:
            state = {"error": str(e)}
    state = dist.all_gather_object(state)[0]
    if "error" in state:
        raise ValueError(state["error"])
    todo = [batches[k] for k in state["todo"]]
    answered = {}                                   # index -> prediction
    if main:
        in_todo = {i for b in todo for i in b}
        answered = {i: done[ids[i]] for i in range(len(ids)) if i not in in_todo}
    n_todo = sum(len(b) for b in todo)
    if todo:
        if main:
            if answered:
                log(f"{out}: {len(answered)} of {len(ids)} records already answered; answering the other {n_todo}")
            out.parent.mkdir(parents=True, exist_ok=True)
            # what is kept, in input order: a cut last line and the lines of partly written batches go
            write_text_atomic(out, "".join(line(i, answered[i]) for i in sorted(answered)))
        model = load_model(a, device)
        log(f"answering {n_todo} records of {data} in {len(todo)} batches of up to {a.batch_size} "
            f"({dist.world_size()} rank(s), {device}, {a.num_workers} data-loader workers)")
        t0, n_done = time.time(), 0
        progress = bar(total=n_todo, desc="answering", unit="sample", dynamic_ncols=True) if bar else None
        dataset = PromptBatches(proc, prompts, images_dir, todo, skip_bad=a.skip_bad_records)
        with open(out, "a", encoding="utf-8", newline="\n") if main else open(os.devnull, "w") as f:
            for results in answer_batches(model, proc, dataset, max_new_tokens=a.max_new_tokens,
                                          num_workers=a.num_workers):
                new = [r for r in results if "skipped" not in r]
                for r in results:
                    if "skipped" in r and main:
                        (progress.write if progress is not None else print)(f"skipped (--skip_bad_records): "
                                                                            f"{r['skipped']}")
                f.write("".join(line(r["index"], r["prediction"]) for r in new))
                f.flush()                         # a kill loses at most the round in flight
                answered.update((r["index"], r["prediction"]) for r in new)
                n_done += len(new)
                if progress is not None:
                    progress.update(len(results))
        if progress is not None:
            progress.close()
        dt = time.time() - t0
        log(f"answered {n_done} records in {dt:.1f} s ({n_done / max(dt, 1e-9):.2f} samples/s)")
    if not main:
        return
    if not todo:
        log(f"{out}: all {len(ids)} records already answered; nothing to do")
    order = sorted(answered)
    write_if_changed(out, "".join(line(i, answered[i]) for i in order))
    log(f"{len(order)} predictions -> {out}")
    results = [{"prediction": answered[i], "answers": answers[i]} for i in order]
    if any(r["answers"] is not None for r in results):
        res = score(results, with_anls)
        log(f"accuracy {res['accuracy']:.4f}" + (f", ANLS {res['anls']:.4f}" if with_anls else "")
            + f" over the {res['n']} records with answers"
            + (f" (of {len(results)})" if res["n"] < len(results) else ""))
        write_if_changed(sidecar(out, "metrics"), json.dumps(res, indent=2) + "\n")
    else:
        log("no record has a reference answer: nothing to score")
    if a.format == "docvqa":
        sub = [{"questionId": question_id(prompts[i].rec, prompts[i].where), "answer": answered[i].strip()}
               for i in order]
        path = sidecar(out, "submission")
        write_if_changed(path, "[\n" + ",\n".join(json.dumps(s, ensure_ascii=False) for s in sub) + "\n]\n")
        log(f"DocVQA submission ({len(sub)} answers) -> {path}")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """The command line; errors are exceptions (the __main__ block turns them into one line)."""
    p = cli.ArgumentParser(prog="phi3v.generate",
                           description="Answer a prompt, or every record of a jsonl, with Phi-3.5-vision "
                                       "(optionally + a LoRA adapter)")
    p.add_argument("--model", required=True, help="HF-layout directory or hub id")
    p.add_argument("--adapter", help="peft adapter directory (e.g. a train.py output_dir)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several / video frames)")
    p.add_argument("--prompt", help="one prompt to answer (or --data)")
    p.add_argument("--system", help="optional system message (with --prompt)")
    p.add_argument("--data", help="a jsonl of our format: answer every record (the last turn; test splits without "
                                  "answers are fine)")
    p.add_argument("--out", help="with --data: the predictions jsonl; ids already in it are kept (resume)")
    p.add_argument("--images_dir", help="with --data: where the records' image paths point (default: images/ "
                                        "beside --data)")
    p.add_argument("--batch_size", type=cli.positive_int, default=None,
                   help="with --data: prompts per generate call (records sorted by prompt length; default 8)")
    p.add_argument("--num_workers", type=cli.non_negative_int, default=None,
                   help="with --data: data-loader processes decoding images while the model generates (default: 2 "
                        "on CUDA, 0 on CPU, where the model's threads already use every core)")
    p.add_argument("--format", choices=["docvqa"],
                   help="with --data: docvqa also writes the official submission file and scores ANLS")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="with --data: skip and list bad records (else the first one is an error)")
    p.add_argument("--no_tqdm", dest="tqdm", action="store_false", help="no progress bars")
    p.add_argument("--num_crops", type=cli.positive_int, help="HD crops per image (default: preprocessor_config.json)")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=None,
                   help="default: 64 with --data (the evaluation's), 256 with --prompt")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=cli.positive_float, default=None, help="with --do_sample (default 1.0)")
    p.add_argument("--top_p", type=cli.probability, default=None,
                   help="nucleus sampling mass, in (0, 1], with --do_sample (default 1.0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun each rank takes cuda:LOCAL_RANK (or the CPU)")
    a = p.parse_args(argv)
    # flags that would be silently ignored are refused, saying why and what to use instead
    sampling = [f"--{k}" for k in ("temperature", "top_p") if getattr(a, k) is not None]
    if sampling and not a.do_sample:
        p.error(f"{' and '.join(sampling)}: only used when sampling; add --do_sample (without it decoding is greedy "
                f"and ignores {'them' if len(sampling) > 1 else 'it'})")
    if a.num_crops is not None and not a.image and a.data is None:
        p.error("--num_crops only applies to images; add --image FILE (or --data) or drop --num_crops")
    a.temperature = 1.0 if a.temperature is None else a.temperature
    a.top_p = 1.0 if a.top_p is None else a.top_p
    if (a.prompt is None) == (a.data is None):
        p.error("give --prompt (one answer) or --data FILE.jsonl --out PREDS.jsonl (a whole dataset)")
    if a.data is not None:
        if not a.out:
            p.error("--data needs --out PREDS.jsonl (the predictions file)")
        for flag in ("image", "system", "do_sample"):
            if getattr(a, flag):
                p.error(f"--{flag} is for --prompt; --data answers each record's own images greedily, as the "
                        "evaluation does")
        if not Path(a.data).is_file():
            p.error(f"--data {a.data}: " + ("not a file" if Path(a.data).exists() else "no such file"))
        if Path(a.out).is_dir():
            p.error(f"--out {a.out} is a directory; expected the predictions jsonl")
        if Path(a.out).resolve() == Path(a.data).resolve():
            p.error(f"--out {a.out} is the --data file itself")
        if a.images_dir and not Path(a.images_dir).is_dir():
            p.error(f"--images_dir {a.images_dir}: no such directory")
    else:      # refused rather than silently ignored
        for flag in ("out", "images_dir", "format", "batch_size", "num_workers", "skip_bad_records"):
            if getattr(a, flag) is not None and getattr(a, flag) is not False:     # 0 workers is given too
                p.error(f"--{flag} goes with --data")
    a.batch_size = a.batch_size or 8
    if a.max_new_tokens is None:
        a.max_new_tokens = 64 if a.data else 256
    if a.adapter and not Path(a.adapter).is_dir():
        p.error(f"--adapter {a.adapter}: no such directory")
    if a.data and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = dist.init()          # torchrun: cuda:LOCAL_RANK, or the CPU with gloo
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    else:
        try:
            device = parse_device(a.device)
        except ValueError as e:
            p.error(str(e))
    for image in a.image:
        if not Path(image).is_file():
            p.error(f"--image {image}: " + ("not a file" if Path(image).exists() else "no such file"))
    if a.data:
        if a.num_workers is None:
            a.num_workers = 2 if device.type == "cuda" else 0
        try:
            answer_dataset(a, device)
        finally:
            dist.cleanup()
        return 0
    model = load_model(a, device)
    proc = load_processor(a)
    print(answer(model, proc, a.prompt, a.image, a.max_new_tokens, a.do_sample, a.temperature, a.top_p, a.system))
    return 0


if __name__ == "__main__":
    # the data-loader workers tokenize one chunk at a time; keep tokenizers' thread pool out of forks
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with cli.errors("phi3v.generate"):
        sys.exit(main())
