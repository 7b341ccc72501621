"""NLVR2 -> nlvr2_{train,val,test}.jsonl + images, two images per record (RECIPE §5).

    python -m convert.nlvr2 --src RAW --out_dir OUT [--val_rows 500]

RAW (a folder, searched recursively, or one file) may hold:
  * the official release: train.json, dev.json, test1.json (test2.json) with one JSON object per
    line {"identifier": "dev-850-0-0", "sentence", "label": "True"|"False", "left_url", ...}, and
    the downloaded images anywhere under RAW, named `{identifier minus its last part}-img0.png`
    (left) and `-img1.png` (right), e.g. dev-850-0-img0.png. Files map to splits train -> train,
    dev -> val, test1 -> test, test2 -> test2. The user text is PROMPT with the sentence; the answer
    is "true" or "false". Images go to `{split}/{file name}` (shared by the sentences of a pair).
    Images cannot be downloaded here (offline); a missing one skips the record with its URL. A
    sentence that is not a string (a null, a number) skips the record, naming the field.
  * The Cauldron `nlvr2` parquet (the recipe's data; columns images [2], texts): wording kept
    verbatim, all QA of a pair as turns (the recipe trains on all of them), ids `{split}-{row:010d}`;
    the first --val_rows (default 500) rows become val, as the recipe's eval = train[:500].
"""
from pathlib import Path

from phi3v.schema import make_record, make_turn

from .common import (Output, add_release_and_cauldron, cli, find_files, read_json_or_jsonl, split_outputs,
                     text_field, val_rows_option)

NAME = "nlvr2"
PROMPT = 'Is this statement about the left and right images true or false? "{sentence}"\nAnswer true or false.'
FILE_SPLITS = {"train": "train", "dev": "val", "test1": "test", "test2": "test2"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _add_lines(out: Output, f: Path, where: str, split: str, index: dict) -> None:
    for line, obj in read_json_or_jsonl(f, out, where):
        ident = obj.get("identifier") if isinstance(obj, dict) else None
        if not isinstance(ident, str) or ident.count("-") < 2:
            out.skip(where, line, None, f"bad identifier {ident!r}")
            continue
        label = str(obj.get("label", "")).strip().lower()
        if label not in ("true", "false"):
            out.skip(where, line, ident, f"label is not True/False (got {obj.get('label')!r})")
            continue
        try:
            sentence = text_field(obj, "sentence").strip()
        except ValueError as e:
            out.skip(where, line, ident, str(e))
            continue
        base = ident.rsplit("-", 1)[0]
        images, rels = {}, []
        for k, side in enumerate(("left", "right")):
            path = index.get(f"{base}-img{k}")
            if path is None:
                out.skip(where, line, ident, f"image not found: {base}-img{k}.png "
                         f"(download it from {obj.get(side + '_url') or 'the NLVR2 release'})")
                break
            rels.append(f"{split}/{path.name}")
            images[rels[-1]] = path
        else:
            turn = make_turn(rels, PROMPT.format(sentence=sentence), label)
            out.add(f"{NAME}_{split}", make_record(ident, NAME, [turn]), where, line, images)


def convert(src, out_dir, strict: bool = False, progress: bool = False, val_rows: int = 500) -> dict:
    """Convert the official NLVR2 json(l) files and/or Cauldron parquet under `src`; returns stats.

    `val_rows` applies to Cauldron input only.
    """
    src = Path(src)
    files = find_files(src, (".json", ".jsonl", ".parquet"))
    out = Output(out_dir, strict=strict, progress=progress, outputs=split_outputs(NAME, FILE_SPLITS.values()))
    index = {}  # image stem -> first path in sorted order
    img_root = src if src.is_dir() else src.parent
    for p in sorted(q for q in img_root.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file()):
        index.setdefault(p.stem, p)
    add_release_and_cauldron(out, src, files, FILE_SPLITS,
                             lambda f, rel, split: _add_lines(out, f, rel, split, index),
                             NAME, val_rows, n_images=2, expected="train/dev/test1/test2 .json(l) files")
    return out.finish()


if __name__ == "__main__":
    cli(convert, __doc__, val_rows_option(500))
