"""Hateful Memes -> hateful_memes_{train,val,test}.jsonl + images (RECIPE §3).

    python -m convert.hateful_memes --src RAW --out_dir OUT [--val_rows 500]

RAW (a folder, searched recursively, or one file) may hold:
  * the Facebook release: img/ plus train.jsonl, dev_seen.jsonl, dev_unseen.jsonl, test_seen.jsonl,
    ... with lines {"id", "img": "img/x.png", "label": 0|1, "text"}. Files map to splits
    train -> train, dev/dev_seen -> val, test/test_seen -> test, dev_unseen -> val_unseen,
    test_unseen -> test_unseen. The user text is PROMPT with the meme text filled in; the answer
    is "yes" (label 1) or "no" (label 0). Images keep their release path (`img/x.png`, written
    once and shared by the splits). Lines without a label (the unlabelled test.jsonl) are skipped, as
    are lines whose id, img or text is not a string (a null, a number; ids may be integers).
  * The Cauldron `hateful_memes` parquet (the recipe's data; columns images, texts): wording kept
    verbatim, all QA as turns, ids `{split}-{row:010d}`. The Cauldron has only a train split;
    like the recipe (eval = train[:500]) the first --val_rows (default 500) rows become val.
"""
from pathlib import Path, PurePosixPath

from phi3v.jsonfile import show
from phi3v.schema import make_record, make_turn

from .common import (Output, add_release_and_cauldron, cli, find_files, id_text, read_json_or_jsonl, split_outputs,
                     text_field, val_rows_option)

NAME = "hateful_memes"
PROMPT = 'The text on this meme reads: "{text}"\nIs this meme hateful? Answer yes or no.'
FILE_SPLITS = {"train": "train", "dev": "val", "dev_seen": "val", "dev_unseen": "val_unseen",
               "test": "test", "test_seen": "test", "test_unseen": "test_unseen"}


def _add_jsonl(out: Output, f: Path, where: str, split: str) -> None:
    for line, obj in read_json_or_jsonl(f, out, where):
        if not isinstance(obj, dict):
            out.skip(where, line, None, f"expected a JSON object, got {show(obj)}")
            continue
        try:
            rid = id_text(obj.get("id"))
        except ValueError as e:
            out.skip(where, line, None, str(e))
            continue
        img, label = obj.get("img"), obj.get("label")
        if not isinstance(img, str) or not img or PurePosixPath(img).is_absolute() or ".." in PurePosixPath(img).parts:
            out.skip(where, line, rid, f"field 'img': expected a relative image path, got {show(img)}")
        elif label not in (0, 1):
            out.skip(where, line, rid, f"no 0/1 label (got {label!r})")
        else:
            try:
                text = text_field(obj, "text")
            except ValueError as e:
                out.skip(where, line, rid, str(e))
                continue
            turn = make_turn([img], PROMPT.format(text=text), "yes" if label == 1 else "no")
            out.add(f"{NAME}_{split}", make_record(rid, NAME, [turn]), where, line, {img: f.parent / img})


def convert(src, out_dir, strict: bool = False, progress: bool = False, val_rows: int = 500) -> dict:
    """Convert the Facebook jsonl release and/or Cauldron parquet under `src`; returns stats.

    `val_rows` applies to Cauldron input only.
    """
    src = Path(src)
    files = find_files(src, (".jsonl", ".parquet"))
    out = Output(out_dir, strict=strict, progress=progress, outputs=split_outputs(NAME, FILE_SPLITS.values()))
    add_release_and_cauldron(out, src, files, FILE_SPLITS, lambda f, rel, split: _add_jsonl(out, f, rel, split),
                             NAME, val_rows, n_images=1,
                             expected=str(sorted(k + ".jsonl" for k in FILE_SPLITS)))
    return out.finish()


if __name__ == "__main__":
    cli(convert, __doc__, val_rows_option(500))
