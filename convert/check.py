"""Validate a jsonl file and its images.

    python -m convert.check FILE.jsonl [--images_dir DIR]

Checks every line (JSON, schema.validate_record, unique ids) and every image (exists, non-empty,
opens with PIL, nonzero width and height; each distinct path checked once). Images are looked up
under --images_dir (default: the `images/` folder beside the jsonl). Prints the counts and the
problems (a line that is not UTF-8 JSON is one); exits 1 if there is any problem, 2 (with one
`convert.check: error:` line) if the file cannot be read at all.
"""
import argparse
from pathlib import Path

from PIL import Image

from phi3v.schema import jsonl_lines, parse_line, validate_record

from .common import image_problem


def check_image(path: Path) -> str | None:
    """None if the image is usable, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            im.load()
            if im.width == 0 or im.height == 0:
                return "zero-size image"
    except Exception as e:
        return f"does not open with PIL: {image_problem(e)}"
    return None


def check(path, images_dir=None) -> dict:
    """Counts {"records", "turns", "images", "problems": [str]} for one jsonl file."""
    path = Path(path)
    images_dir = Path(images_dir) if images_dir else path.parent / "images"
    stats = {"records": 0, "turns": 0, "images": 0, "problems": []}
    probs = stats["problems"]
    seen_ids, seen_images = {}, {}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    for line_no, raw in jsonl_lines(path):
        where = f"{path}:{line_no}"
        try:
            rec = parse_line(raw, where)     # not UTF-8 or not JSON: a problem of this line
            validate_record(rec, where)
        except ValueError as e:
            probs.append(str(e))
            continue
        stats["records"] += 1
        if rec["id"] in seen_ids:
            probs.append(f"{where}: field 'id': duplicate {rec['id']!r} (first at line {seen_ids[rec['id']]})")
        seen_ids.setdefault(rec["id"], line_no)
        for t, turn in enumerate(rec["conversations"]):
            stats["turns"] += 1
            for i, rel in enumerate(turn["images"]):
                stats["images"] += 1
                if rel not in seen_images:
                    seen_images[rel] = check_image(images_dir / rel)
                if seen_images[rel]:
                    probs.append(f"{where}: field 'conversations[{t}].images[{i}]': "
                                 f"{images_dir / rel}: {seen_images[rel]}")
    stats["distinct_images"] = len(seen_images)
    return stats


if __name__ == "__main__":
    import sys

    from phi3v import cli

    p = cli.ArgumentParser(prog="convert.check", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="jsonl file to check")
    p.add_argument("--images_dir", default=None, help="image folder (default: images/ beside the file)")
    p.add_argument("--max_problems", type=cli.non_negative_int, default=50, help="problems to print (default 50)")
    a = p.parse_args()
    with cli.errors("convert.check", status=2):     # could not check at all: 2 (problems found: 1)
        s = check(a.file, a.images_dir)
    for msg in s["problems"][:a.max_problems]:
        print(msg)
    if len(s["problems"]) > a.max_problems:
        print(f"... and {len(s['problems']) - a.max_problems} more")
    print(f"{a.file}: {s['records']} records, {s['turns']} turns, {s['images']} images "
          f"({s['distinct_images']} distinct), {len(s['problems'])} problems")
    sys.exit(1 if s["problems"] else 0)
