"""DocVQA -> docvqa_{train,val,test}.jsonl + images (RECIPE §4).

    python -m convert.docvqa --src RAW --out_dir OUT

RAW (a folder, searched recursively, or one file) may hold any of:
  * HF parquet files of `nielsr/docvqa_1200_examples` (columns id, image {bytes, path},
    query {en, ...}, answers [...]): user `{query['en']}\\nAnswer briefly.`, assistant = answers[0],
    all answers kept in the extra field "answers"; image `{split}/{id}.{ext}`.
  * the official json release (`{"data": [{"questionId", "question", "image": "documents/x.png",
    "answers"}]}`, images relative to the json file): same prompt and answers; image
    `{split}/documents/x.png` (written once, shared by its questions); id = str(questionId).
  * The Cauldron `docvqa` parquet (columns images, texts): one record per document with every QA
    as a turn, wording verbatim (the recipe's --full_train data); ids `{split}-{row:010d}`.
The split comes from the file name (train*/val*/validation*/dev*/test*), a parent folder, or the
json's "dataset_split". Questions without answers (the official test set) are skipped and reported.
"""
import json
from pathlib import Path, PurePosixPath

from phi3v.schema import make_record, make_turn

from .common import (ConvertError, Output, add_cauldron, cli, find_files, image_ext, is_cauldron, parquet_rows,
                     read_text, safe_name, split_from_name, split_of, val_rows_option)

NAME = "docvqa"
SUFFIX = "\nAnswer briefly."


def _answers(value) -> list:
    return [str(a) for a in value] if isinstance(value, (list, tuple)) else []


def _question(query) -> str | None:
    if isinstance(query, dict):
        return query.get("en")
    return query if isinstance(query, str) else None


def _add_qa(out, split, rid, question, answers, where, line, rel, src):
    if not isinstance(question, str) or not question:
        out.skip(where, line, rid, f"question is not a string: {question!r:.60}" if question else "no question text")
    elif not answers:
        out.skip(where, line, rid, "no answers (unlabelled split)")
    else:
        turn = make_turn([rel], question + SUFFIX, answers[0])
        out.add(f"{NAME}_{split}", make_record(rid, NAME, [turn], answers=answers), where, line, {rel: src})


def _add_parquet(out: Output, f: Path, where: str, split: str) -> None:
    for i, r in enumerate(parquet_rows(f)):
        rid, line = str(r.get("id")), f"row {i}"
        data = (r.get("image") or {}).get("bytes")
        ext = image_ext(data) if data else None
        if ext is None:
            out.skip(where, line, rid, "image has no decodable bytes")
            continue
        rel = f"{split}/{safe_name(rid)}.{ext}"
        _add_qa(out, split, rid, _question(r.get("query")), _answers(r.get("answers")), where, line, rel, data)


def _add_json(out: Output, f: Path, where: str, doc: dict) -> None:
    split = split_from_name(str(doc.get("dataset_split", ""))) or split_of(Path(where))
    if split is None:
        raise ConvertError(f"{where}: cannot tell the split (no dataset_split, file name not train*/val*/test*)")
    for i, item in enumerate(doc["data"]):
        line = f"item {i}"
        if not isinstance(item, dict):
            out.skip(where, line, None, "item is not an object")
            continue
        rid = str(item.get("questionId", ""))
        img = str(item.get("image", ""))
        parts = PurePosixPath(img).parts
        if not img or PurePosixPath(img).is_absolute() or ".." in parts:
            out.skip(where, line, rid, f"bad image path {img!r}")
            continue
        _add_qa(out, split, rid, item.get("question"), _answers(item.get("answers")), where, line,
                f"{split}/{img}", f.parent / img)


def convert(src, out_dir, strict: bool = False, progress: bool = False, val_rows: int = 0) -> dict:
    """Convert DocVQA parquet/json files under `src`; returns stats.

    `val_rows` moves the first rows of a Cauldron train split to val (the recipe evaluates DocVQA
    on the nielsr test split instead, hence 0).
    """
    src = Path(src)
    files = find_files(src, (".parquet", ".json"))
    out = Output(out_dir, strict=strict, progress=progress)
    cauldron, n_used = [], 0
    for f in files:
        rel = f.relative_to(src) if f != src else Path(f.name)
        where = rel.as_posix()
        if f.suffix == ".parquet":
            if is_cauldron(f):
                cauldron.append(f)
            else:
                split = split_of(rel)
                if split is None:
                    raise ConvertError(f"{where}: cannot tell the split from the file or folder name")
                _add_parquet(out, f, where, split)
            n_used += 1
        elif split_of(rel) is not None or f == src:
            try:
                doc = json.loads(read_text(f, where))
            except json.JSONDecodeError as e:
                raise ConvertError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
            if isinstance(doc, dict) and isinstance(doc.get("data"), list):
                _add_json(out, f, where, doc)
                n_used += 1
    if cauldron:
        add_cauldron(out, cauldron, NAME, src, val_rows=val_rows, n_images=1)
    if n_used == 0:
        raise ConvertError(f"{src}: no DocVQA parquet or json (with a 'data' list) files found")
    return out.finish()


if __name__ == "__main__":
    cli(convert, __doc__, val_rows_option(0))
