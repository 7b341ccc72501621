"""Shared converter machinery: split names, skip reports, image writing, deterministic output.

Every converter builds an `Output` and feeds it records in input order (sorted files, row order);
`Output.add` validates each record, rejects duplicate ids and writes its images (a record whose
image is missing or broken is skipped); `finish()` writes `OUT/<file>.jsonl` and
`OUT/skipped.jsonl`. The same input gives byte-identical output: fixed key order, one JSON
spelling (`dumps`), images copied byte-for-byte or named by content, skip reasons built from the
input's text only (no object reprs or memory addresses). Text fields are taken only when they are
strings (`text_field`): a JSON null or a number never becomes training text. Files of an earlier
conversion that this one does not write again (a split the new input lacks) are removed and listed.
"""
import base64
import hashlib
import io
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from phi3v import cli as phi3v_cli
from phi3v.jsonfile import show, write_atomic, write_text_atomic
from phi3v.schema import jsonl_lines, make_record, make_turn, validate_record

# Formats PIL reads that we keep byte-for-byte; anything else is re-encoded to PNG.
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val",
                 "valid": "val", "dev": "val", "test": "test"}


class ConvertError(ValueError):
    """Bad input under --strict, or input the converter cannot interpret at all."""


def split_from_name(name: str) -> str | None:
    """'train-00000-of-00001.parquet' -> 'train', 'val_v1.0.json' -> 'val', 'dev.json' -> 'val'."""
    m = re.match(r"(training|train|validation|valid|val|dev|test)(?![a-z])", name.lower())
    return SPLIT_ALIASES[m.group(1)] if m else None


def text_value(value, field: str) -> str:
    """`value` if it is a string; else ValueError naming the field and what it holds: a null or a
    number never becomes training text (str(None) would be the word "None")."""
    if not isinstance(value, str):
        raise ValueError(f"field {field!r}: expected a string, got {show(value)}")
    return value


def text_field(obj: dict, key: str, field: str | None = None) -> str:
    """`text_value(obj[key])`, named `field` (default `key`); a missing key is an error too."""
    if key not in obj:
        raise ValueError(f"field {field or key!r}: missing, expected a string")
    return text_value(obj[key], field or key)


def id_text(value, field: str = "id") -> str:
    """An input id (a string or an integer) as a record id; ValueError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"field {field!r}: expected a string or an integer, got {show(value)}")
    return str(value)


def image_problem(e: Exception) -> str:
    """What is wrong with an image, in words that are the same on every run (PIL's own message for
    an unknown format quotes the file object's repr, memory address included)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    return stable(f"{type(e).__name__}: {e}")


def stable(text: str) -> str:
    """`text` without object reprs that hold a memory address (`<_io.BytesIO object at 0x7f..>`)."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", text)


def safe_name(s) -> str:
    """A file-name-safe version of an id (keeps letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(s))


def dumps(obj) -> str:
    """The one JSON spelling we write: insertion key order, UTF-8 text, no ASCII escaping."""
    return json.dumps(obj, ensure_ascii=False)


def image_ext(data: bytes) -> str | None:
    """File extension for encoded image bytes (header only), or None if PIL cannot identify them."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return KEEP_FORMATS.get(im.format, "png")
    except Exception:
        return None


def decode_data_url(url: str) -> bytes:
    """Bytes of a base64 `data:` URL; ValueError if it is not one."""
    head, sep, payload = url.partition(",")
    if not head.startswith("data:") or not sep or not head.endswith(";base64"):
        raise ValueError(f"not a base64 data: URL ({url[:40]!r}...)")
    return base64.b64decode(payload, validate=False)


def content_name(data: bytes) -> str:
    """Deterministic file stem for image bytes (dedupes identical images)."""
    return hashlib.sha1(data).hexdigest()[:16]


def write_image(dst: Path, src) -> None:
    """Write one image: `src` is a Path (copied verbatim) or bytes. Raises if it does not decode.

    Bytes in a format outside KEEP_FORMATS are re-encoded as PNG (dst names .png then).
    """
    data = src.read_bytes() if isinstance(src, Path) else src
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.width == 0 or im.height == 0:
            raise ValueError("zero-size image")
        keep = im.format in KEEP_FORMATS
        if not keep:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data = buf.getvalue()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.stat().st_size == len(data) and dst.read_bytes() == data:
        return
    write_atomic(dst, lambda p: p.write_bytes(data))


def parallel_map(fn, items: list, workers: int, progress: bool, desc: str):
    """`[fn(x) for x in items]` in order, on `workers` processes, with a tqdm progress bar."""
    from tqdm import tqdm

    bar = dict(total=len(items), desc=desc, disable=None if progress else True, file=sys.stderr, leave=False)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), **bar))


def _source_key(src):
    return ("bytes", hashlib.sha1(src).hexdigest()) if isinstance(src, bytes) else ("file", str(src))


class Output:
    """Collects records per output file, writes their images as they come, then the jsonl files.

    `add(stem, record, file, line, images)` validates the record, rejects a duplicate id, and writes
    each image of `images` ({relative path: Path to copy or encoded bytes}) under OUT/images/
    (once per path). `finish()` writes OUT/{stem}.jsonl for each stem and OUT/skipped.jsonl, whose
    lines are {"file", "line", "id", "reason"}. With strict=True the first skipped item raises.
    `outputs`: the stems of every file this converter can write (e.g. "docvqa_test"); those that
    exist in OUT from an earlier conversion but are not written this time are removed by finish().
    """

    def __init__(self, out_dir, strict: bool = False, progress: bool = False, outputs=()):
        self.out_dir = Path(out_dir)
        self.strict = strict
        self.outputs = tuple(outputs)
        self.lines: dict[str, list] = {}            # file stem -> [json line]
        self.ids: dict[str, set] = {}
        self.images: dict[str, tuple] = {}          # rel path -> (source key, error or None)
        self.skipped: list[dict] = []
        from tqdm import tqdm

        # progress bars on a terminal only (disable=None: off when stderr is a pipe or a file)
        self.bar = tqdm(desc="records", disable=None if progress else True, file=sys.stderr, leave=False)

    def skip(self, file, line, id, reason: str) -> None:
        """Report one skipped input item (or raise ConvertError under strict)."""
        file, reason = str(file), stable(reason)     # a repr with an address would differ between runs
        if self.strict:
            loc = f"{file}:{line}" if line is not None else file
            raise ConvertError(f"{loc}: {reason}" + (f" (id {id})" if id is not None else ""))
        self.skipped.append({"file": file, "line": line, "id": id, "reason": reason})

    def _image(self, rel: str, src) -> str | None:
        key = _source_key(src)
        if rel in self.images:
            old_key, err = self.images[rel]
            return err if old_key == key else f"image path {rel!r} already used for a different image"
        try:
            write_image(self.out_dir / "images" / rel, src)
            err = None
        except FileNotFoundError:
            err = f"image not found: {src}"
        except Exception as e:
            err = f"unreadable image {src if isinstance(src, Path) else '(embedded bytes)'}: {image_problem(e)}"
        self.images[rel] = (key, err)
        return err

    def add(self, stem: str, record: dict, file, line, images: dict | None = None) -> bool:
        """Register a record for OUT/{stem}.jsonl; invalid, duplicate or image-less ones are skipped."""
        self.bar.update(1)
        rid = record.get("id")
        try:
            validate_record(record, f"{file}:{line}")
        except ValueError as e:
            self.skip(file, line, rid, f"invalid record: {e}")
            return False
        seen = self.ids.setdefault(stem, set())
        if rid in seen:
            self.skip(file, line, rid, f"duplicate id {rid!r} in {stem}.jsonl")
            return False
        for rel, src in sorted((images or {}).items()):
            err = self._image(rel, src)
            if err:
                self.skip(file, line, rid, err)
                return False
        seen.add(rid)
        self.lines.setdefault(stem, []).append(dumps(record) + "\n")
        return True

    def finish(self) -> dict:
        """Write the jsonl files and skipped.jsonl (always, empty when nothing was skipped), remove
        this converter's files of an earlier conversion that this one did not write; return stats
        ("removed": the names of those files)."""
        self.bar.close()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stem in sorted(self.lines):
            write_text(self.out_dir / f"{stem}.jsonl", "".join(self.lines[stem]))
        write_text(self.out_dir / "skipped.jsonl", "".join(dumps(s) + "\n" for s in self.skipped))
        removed = []
        for stem in sorted(set(self.outputs) - set(self.lines)):
            stale = self.out_dir / f"{stem}.jsonl"
            if stale.is_file():
                stale.unlink()
                removed.append(stale.name)
        n_img = sum(1 for _, err in self.images.values() if err is None)
        return {"records": {f"{stem}.jsonl": len(v) for stem, v in sorted(self.lines.items())},
                "images": n_img, "skipped": len(self.skipped), "removed": removed, "out_dir": str(self.out_dir)}


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (tmp file + rename), '\\n' line ends on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def read_text(path: Path, where: str) -> str:
    """A UTF-8 text file's content; ConvertError naming `where` and the line of a non-UTF-8 byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConvertError(f"{where}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") \
            from None


def read_json_or_jsonl(path: Path, out: Output, where: str) -> list:
    """[(line, obj)] from a JSON list file or a jsonl file; broken jsonl lines (not JSON, not UTF-8)
    are skipped/reported.

    For a JSON list, `line` is the item index (reported as 'item N'). `where` names the file in reports."""
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").strip()
    if raw.startswith(b"["):
        text = read_text(path, where)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise ConvertError(f"{where}: expected a JSON list of items")
        return [(f"item {i}", obj) for i, obj in enumerate(items)]
    if raw.startswith(b"{") and b"\n" in raw and b"\n{" not in raw:
        try:   # a single JSON object (e.g. DocVQA's {"data": [...]}) spanning several lines
            return [(1, json.loads(read_text(path, where)))]
        except json.JSONDecodeError:
            pass
    rows = []
    for line_no, raw_line in jsonl_lines(path):
        try:
            line = raw_line.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            out.skip(where, line_no, None, f"not UTF-8 text (byte 0x{raw_line[e.start]:02x} at column {e.start + 1})")
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            out.skip(where, line_no, None, f"broken JSON line: {e.msg}")
    return rows


def split_outputs(name: str, splits) -> list:
    """The output stems `{name}_{split}` a dataset converter can write: its own splits and those a
    Cauldron parquet or a split-named file can give (train, val, test)."""
    return [f"{name}_{s}" for s in sorted(set(splits) | set(SPLIT_ALIASES.values()))]


def split_of(path: Path) -> str | None:
    """Split named by a file ('train-0000.parquet') or, failing that, by one of its parent folders."""
    for name in [path.name] + [p.name for p in path.parents]:
        split = split_from_name(name)
        if split:
            return split
    return None


def find_files(src: Path, suffixes: tuple) -> list:
    """`src` itself if it is a file, else the files under it with these suffixes, sorted."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    if src.is_file():
        return [src]
    return sorted(p for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def parquet_rows(path: Path):
    """Rows of a parquet file as dicts, read in batches (Cauldron shards are ~400 MB)."""
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:      # pyarrow's ArrowInvalid/ArrowIOError: corrupt or truncated
        raise ConvertError(f"{path}: cannot read parquet file: {e}") from None


def parquet_columns(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read parquet file: {e}") from None


def is_cauldron(path: Path) -> bool:
    """The Cauldron layout: columns `images` [{bytes, path}] and `texts` [{user, assistant, source}]."""
    return {"images", "texts"} <= set(parquet_columns(path))


def add_cauldron(out: Output, files: list, name: str, root: Path, val_rows: int = 0,
                 n_images: int | None = None) -> None:
    """Records from The Cauldron parquet shards (sorted): one record per row, all its QA as turns.

    Images attach to the first turn; the user/assistant wording is kept verbatim. Rows are numbered
    over all shards; of the train rows, the first `val_rows` go to val (the recipe's eval split is
    `train[:500]`). Ids are f"{split}-{row:010d}", images `{split}/{id}.{k}.{ext}`.
    """
    if val_rows < 0:
        raise ConvertError(f"val_rows must be >= 0, got {val_rows}")
    row = 0
    for f in files:
        where = f.relative_to(root).as_posix() if f != root else f.name
        split = split_of(f.relative_to(root) if f != root else Path(f.name)) or "train"
        for r in parquet_rows(f):
            this = "val" if split == "train" and row < val_rows else split
            rid = f"{this}-{row:010d}"
            line = f"row {row}"
            row += 1
            ims, texts = r.get("images") or [], r.get("texts") or []
            if not isinstance(ims, list) or not isinstance(texts, list):
                out.skip(where, line, rid, "columns images and texts must be lists")
                continue
            if n_images is not None and len(ims) != n_images:
                out.skip(where, line, rid, f"expected {n_images} image(s), found {len(ims)}")
                continue
            if not texts:
                out.skip(where, line, rid, "no texts")
                continue
            images, rels = {}, []
            for k, im in enumerate(ims):
                data = im.get("bytes") if isinstance(im, dict) else None
                ext = image_ext(data) if isinstance(data, bytes) and data else None
                if ext is None:
                    break
                rels.append(f"{this}/{rid}.{k}.{ext}")
                images[rels[-1]] = data
            if len(rels) != len(ims):
                out.skip(where, line, rid, f"image {len(rels)} has no decodable bytes")
                continue
            try:
                turns = [cauldron_turn(t, j, rels if j == 0 else []) for j, t in enumerate(texts)]
            except ValueError as e:
                out.skip(where, line, rid, str(e))
                continue
            out.add(f"{name}_{this}", make_record(rid, name, turns), where, line, images)


def cauldron_turn(t, j: int, images: list) -> dict:
    """Turn j of a Cauldron row from its texts[j] = {"user", "assistant", ...} (both strings)."""
    if not isinstance(t, dict):
        raise ValueError(f"field 'texts[{j}]': expected an object with user and assistant, got {show(t)}")
    return make_turn(images, text_field(t, "user", f"texts[{j}].user"),
                     text_field(t, "assistant", f"texts[{j}].assistant"))


def add_release_and_cauldron(out: "Output", src: Path, files: list, file_splits: dict, add_file, name: str,
                             val_rows: int, n_images: int, expected: str) -> None:
    """Shared loop of the hateful-memes and NLVR2 converters: official release files (stem in
    `file_splits`) go to `add_file(f, rel, split)`, Cauldron parquet files to add_cauldron."""
    cauldron, n_used = [], 0
    for f in files:
        rel = (f.relative_to(src) if f != src else Path(f.name)).as_posix()
        if f.suffix == ".parquet":
            if is_cauldron(f):
                cauldron.append(f)
        elif f.stem in file_splits:
            add_file(f, rel, file_splits[f.stem])
            n_used += 1
    if cauldron:
        add_cauldron(out, cauldron, name, src, val_rows=val_rows, n_images=n_images)
        n_used += len(cauldron)
    if n_used == 0:
        raise ConvertError(f"{src}: no {expected} and no Cauldron parquet found")


def local_image(path: str, folder: Path) -> tuple:
    """(relative output path, source Path) for an image path from a json file.

    A clean relative path is kept (`coco/x.jpg` -> images/coco/x.jpg); an absolute path or one
    with '..' goes to `external/{sha1 of the path}{suffix}`. `file://` URLs are accepted.
    """
    if path.startswith("file://"):
        path = path[len("file://"):]
    pp = PurePosixPath(path.replace("\\", "/"))
    src = Path(path) if pp.is_absolute() else folder / path
    if pp.is_absolute() or ".." in pp.parts:
        return f"external/{hashlib.sha1(path.encode()).hexdigest()[:16]}{pp.suffix}", src
    return pp.as_posix(), src


def strip_placeholders(text: str, tag: str = "<image>") -> str:
    """Text with `tag` placeholders (and the newline next to each) removed."""
    return text.replace(tag + "\n", "").replace("\n" + tag, "").replace(tag, "").strip()


def pair_turns(msgs: list) -> tuple:
    """[(role, payload)] with roles system?/user/assistant alternating -> (system, [(user, assistant)]).

    Raises ValueError describing the first problem.
    """
    system = None
    if msgs and msgs[0][0] == "system":
        system, msgs = msgs[0][1], msgs[1:]
    if not msgs:
        raise ValueError("no user/assistant messages")
    if len(msgs) % 2:
        raise ValueError(f"{len(msgs)} messages: expected user/assistant pairs")
    pairs = []
    for j in range(0, len(msgs), 2):
        (r1, a), (r2, b) = msgs[j], msgs[j + 1]
        if (r1, r2) != ("user", "assistant"):
            raise ValueError(f"messages {j}, {j + 1} have roles {r1!r}, {r2!r}; expected 'user', 'assistant'")
        pairs.append((a, b))
    return system, pairs


def item_id(item: dict, index: int, stem: str) -> str:
    """A chat item's id as a string (ids may be strings or integers); "{stem}-{index:08d}" if absent."""
    rid = item.get("id")
    return f"{stem}-{index:08d}" if rid is None else id_text(rid)


def val_rows_option(default: int) -> tuple:
    """The --val_rows option of the converters that read Cauldron parquet (docvqa, hateful_memes, nlvr2)."""
    return (["--val_rows"], dict(type=phi3v_cli.non_negative_int, default=default,
                                 help=f"Cauldron only: first N train rows go to val (default {default})"))


def chat_file_options(source: str) -> tuple:
    """The extra CLI options of the chat-format converters (llava, sharegpt), for `cli`."""
    return ((["--image_folder"], dict(default=None, help="folder the local image paths are relative to")),
            (["--source"], dict(default=source, type=_name, help=f'value of the "source" field (default {source})')))


def _name(text: str) -> str:
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


def convert_chat_file(src, out_dir, to_record, image_folder=None, source: str = "", strict: bool = False,
                      progress: bool = False) -> dict:
    """Shared loop of the chat-format converters (llava, sharegpt): one json/jsonl file in,
    `OUT/<stem>.jsonl` out; `to_record(item, index, stem, source, folder) -> (record, images)`."""
    src = Path(src)
    if not src.is_file():
        raise ConvertError(f"{src}: not a file")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise ConvertError(f"image_folder {image_folder}: no such folder")
    if not isinstance(source, str) or not source.strip():
        raise ConvertError(f"source must be a non-empty name (every record's \"source\"), got {source!r}")
    folder = Path(image_folder) if image_folder else src.parent
    out = Output(out_dir, strict=strict, progress=progress)
    for i, (line, item) in enumerate(read_json_or_jsonl(src, out, src.name)):
        try:
            rec, images = to_record(item, i, src.stem, source, folder)
        except ValueError as e:
            rid = item.get("id") if isinstance(item, dict) else None
            ok = isinstance(rid, (str, int)) and not isinstance(rid, bool)
            out.skip(src.name, line, str(rid) if ok else None, str(e))
            continue
        out.add(src.stem, rec, src.name, line, images)
    out.lines.setdefault(src.stem, [])
    return out.finish()


def cli(convert_fn, doc: str, *options, workers: bool = False) -> None:
    """The command line every converter shares: --src, --out_dir, --strict, --no_progress (and
    --workers for converters that use processes), plus `options`, each `(flags, argparse kwargs)`
    whose dest is a keyword of `convert_fn`. Prints the stats as JSON, or one error line
    `convert.<name>: error: ...` and exit 1 (bad arguments: exit 2)."""
    import argparse

    prog = phi3v_cli.program_name()
    p = phi3v_cli.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="raw dataset folder (or file)")
    p.add_argument("--out_dir", required=True, help="output folder (jsonl files + images/)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar (there is none unless stderr is a terminal)")
    if workers:
        p.add_argument("--workers", type=phi3v_cli.positive_int, default=1,
                       help="parallel worker processes (default 1)")
    for flags, kwargs in options:
        p.add_argument(*flags, **kwargs)
    kw = vars(p.parse_args())
    kw["progress"] = not kw.pop("no_progress")
    out = Path(kw["out_dir"])
    if out.exists() and not out.is_dir():
        p.error(f"--out_dir {out} is a file, not a folder")
    with phi3v_cli.errors(prog):
        stats = convert_fn(**kw)
    print(json.dumps(stats, indent=1))
    if stats.get("removed"):
        print(f"removed {', '.join(stats['removed'])} from {stats['out_dir']}: output of an earlier conversion "
              "that this input does not produce", file=sys.stderr)
    if stats.get("skipped"):
        print(f"{stats['skipped']} item(s) skipped: see {Path(stats['out_dir']) / 'skipped.jsonl'}",
              file=sys.stderr)
