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
json's "dataset_split". Questions without answers (the official test set) are skipped and reported,
as are items whose id, question or any answer is not a string (a null, a number): the field is named.
"""
import json
from pathlib import Path, PurePosixPath

from phi3v.jsonfile import show
from phi3v.schema import make_record, make_turn

from .common import (ConvertError, Output, add_cauldron, cli, find_files, id_text, image_ext, is_cauldron,
                     parquet_rows, read_text, safe_name, split_from_name, split_of, split_outputs, text_field,
                     text_value, val_rows_option)

NAME = "docvqa"
SUFFIX = "\nAnswer briefly."


def _question(item: dict, key: str) -> str:
    """The question text: item[key] (official json "question"), or item[key]["en"] (nielsr "query")."""
    if isinstance(item.get(key), dict):
        return text_field(item[key], "en", f"{key}.en")
    return text_field(item, key)


def _answers(value) -> list:
    """The answers as strings; [] when there are none (unlabelled); ValueError naming a non-string one."""
    if value is None or value == []:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"field 'answers': expected a list of strings, got {show(value)}")
    return [text_value(a, f"answers[{i}]") for i, a in enumerate(value)]


def _add_qa(out, split, rid, item, qkey, where, line, rel, src):
    try:
        question, answers = _question(item, qkey), _answers(item.get("answers"))
    except ValueError as e:
        out.skip(where, line, rid, str(e))
        return
    if not question.strip():
        out.skip(where, line, rid, f"field {qkey!r}: no question text")
    elif not answers:
        out.skip(where, line, rid, "no answers (unlabelled split)")
    else:
        turn = make_turn([rel], question + SUFFIX, answers[0])
        out.add(f"{NAME}_{split}", make_record(rid, NAME, [turn], answers=answers), where, line, {rel: src})


def _add_parquet(out: Output, f: Path, where: str, split: str) -> None:
    for i, r in enumerate(parquet_rows(f)):
        line = f"row {i}"
        try:
            rid = id_text(r.get("id"))
        except ValueError as e:
            out.skip(where, line, None, str(e))
            continue
        data = (r.get("image") or {}).get("bytes")
        ext = image_ext(data) if data else None
        if ext is None:
            out.skip(where, line, rid, "image has no decodable bytes")
            continue
        rel = f"{split}/{safe_name(rid)}.{ext}"
        _add_qa(out, split, rid, r, "query", where, line, rel, data)


def _add_json(out: Output, f: Path, where: str, doc: dict) -> None:
    split = split_from_name(str(doc.get("dataset_split", ""))) or split_of(Path(where))
    if split is None:
        raise ConvertError(f"{where}: cannot tell the split (no dataset_split, file name not train*/val*/test*)")
    for i, item in enumerate(doc["data"]):
        line = f"item {i}"
        if not isinstance(item, dict):
            out.skip(where, line, None, "item is not an object")
            continue
        try:
            rid = id_text(item.get("questionId"), "questionId")
        except ValueError as e:
            out.skip(where, line, None, str(e))
            continue
        img = item.get("image")
        if not isinstance(img, str) or not img or PurePosixPath(img).is_absolute() or ".." in PurePosixPath(img).parts:
            out.skip(where, line, rid, f"field 'image': expected a relative image path, got {show(img)}")
            continue
        _add_qa(out, split, rid, item, "question", where, line, f"{split}/{img}", f.parent / img)


def convert(src, out_dir, strict: bool = False, progress: bool = False, val_rows: int = 0) -> dict:
    """Convert DocVQA parquet/json files under `src`; returns stats.

    `val_rows` moves the first rows of a Cauldron train split to val (the recipe evaluates DocVQA
    on the nielsr test split instead, hence 0).
    """
    src = Path(src)
    files = find_files(src, (".parquet", ".json"))
    out = Output(out_dir, strict=strict, progress=progress, outputs=split_outputs(NAME, ()))
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
