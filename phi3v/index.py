"""The index of a training jsonl: where every record is and its exact token count, built fast, cached.

`JsonlDataset` (data.py) holds no records: it keeps, per usable record, its byte offset and size in
the file, its line number and its exact token count (images included), as numpy arrays (20 bytes a
record), and reads a record's line when a worker needs it. This module computes those arrays.

Exact counts without decoding pixels: an image's token count follows from its header (width,
height) and num_crops; each distinct image is opened once. Each turn's text is what the dataset
tokenizes: the prompt (chat template, image tags) split at the tags into chunks that each get a BOS,
and the answer. The chunks before the last tag are template pieces, counted once; the rest, two
texts per turn, go to the tokenizer in large batches (`encode_batch_fast`, multi-threaded Rust,
GIL released) on a thread while the next block of lines is parsed.

Cache: `<cache_dir>/<stem>-<key>.idx`, where the key hashes what names the index (the jsonl's
resolved path, the images directory, the tokenizer files, num_crops, INDEX_VERSION). What says
whether it is still valid is checked at every load: the jsonl's size, mtime and a content hash, and
the size and mtime of every image it refers to (missing ones included). A stale, truncated or
damaged cache file is rebuilt, never trusted (a CRC-32 covers the whole file). Writes are atomic.
Malformed records are indexed with their one-line reasons; `max_length` and the error/skip policies
are applied by the dataset when it loads the index, so changing them does not rebuild it.

With torchrun, local rank 0 of each node loads or builds the index; the other ranks wait for it and
load the cached file (they never tokenize), unless caching is off (`cache_dir=False`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import dist
from .jsonfile import write_atomic
from .processor import IMAGE_TAG, Processor, num_image_tokens, user_content
from .schema import parse_line, validate_record

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
INDEX_VERSION = 1          # bump when what a count means changes: every cached index is rebuilt
CACHE_ENV = "PHI3V_CACHE"
MAGIC = b"PHI3VIDX"
BLOCK = 1 << 20            # bytes of jsonl read (and lines tokenized) at a time
FULL_HASH_BYTES = 64 << 20     # files up to this size are hashed whole, larger ones by samples
ARRAYS = (("offsets", np.int64), ("nbytes", np.int32), ("lines", np.int32), ("lengths", np.int32))


def turn_prompt(proc: Processor, turn: dict) -> str:
    """The prompt of one training turn: its images' tags (numbered from 1: every turn is a prompt
    of its own, processor.image_tags) in front of the user text, in the chat template."""
    msg = {"role": "user", "content": user_content(turn["user"], len(turn["images"]))}
    return proc.apply_chat_template([msg], add_generation_prompt=True)


def image_file(images_dir: Path, rel: str, where: str | None = None) -> Path:
    """`images_dir / rel`; ValueError (naming `where`, file:line) if there is no such file."""
    p = Path(images_dir) / rel
    if not p.is_file():
        raise ValueError((f"{where}: " if where else "") + f"image {rel!r} not found (looked for {p})")
    return p


def image_tokens(images_dir: Path, rel: str, num_crops: int) -> int:
    """An image's token count from its header (width, height) and num_crops, without decoding its
    pixels; ValueError saying why not (missing, unreadable, a size the processor rejects)."""
    p = image_file(images_dir, rel)
    try:
        with Image.open(p) as im:
            w, h = im.size
        return num_image_tokens(w, h, num_crops)
    except Exception as e:    # PIL's own types for unreadable files; ValueError for bad geometry
        raise ValueError(f"cannot open image {rel!r}: {e}") from None


def default_cache_dir() -> Path:
    """`$PHI3V_CACHE`, else `~/.cache/phi3v`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "phi3v")


@dataclass
class Index:
    """The usable records of a jsonl, in file order (arrays of equal length), and the rest."""
    offsets: np.ndarray      # [n] int64: byte offset of the record's line
    nbytes: np.ndarray       # [n] int32: its length in bytes (without the newline)
    lines: np.ndarray        # [n] int32: its line number, from 1
    lengths: np.ndarray      # [n] int32: exact token count (images included)
    bad: list                # [(line, "file:line: reason")] of every malformed record, in file order
    source: str = "built"    # "built" or "cache"
    note: str | None = None  # why a wanted cache was not used or written

    def __len__(self) -> int:
        return len(self.offsets)


# ------------------------------------------------------------------------------------------------
# identity: what names a cache file, and what makes it stale

def file_fingerprint(path: Path) -> list:
    """[size, mtime_ns, content hash]: the whole file's CRC-32 up to FULL_HASH_BYTES, above that
    the CRC-32 of 64 evenly spaced 1 MiB blocks (a cheap hash of a big file; mtime covers edits)."""
    st = path.stat()
    crc = 0
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            while block := f.read(BLOCK):
                crc = zlib.crc32(block, crc)
        else:
            step = (st.st_size - (1 << 20)) // 63
            for k in range(64):
                f.seek(k * step)
                crc = zlib.crc32(f.read(1 << 20), crc)
    return [st.st_size, st.st_mtime_ns, crc]


def image_stat(path: Path) -> list:
    """[size, mtime_ns] of an image file, [-1, -1] if there is none (so one that appears is seen)."""
    try:
        st = path.stat()
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def cache_name(path: Path, images_dir: Path, proc: Processor) -> str:
    """`<stem>-<key>.idx`: key = hash of the jsonl's path, the images directory, the tokenizer and
    its settings (tokenizer.json, tokenizer_config.json with the chat template), num_crops."""
    tok = proc._tokenizer_json if proc._tokenizer_json is not None else proc.tokenizer.to_str()
    h = hashlib.sha256()
    for part in (str(path.resolve()), str(images_dir.resolve()), tok,
                 json.dumps(proc.tokenizer_config, sort_keys=True, default=str),
                 str(proc.num_crops), str(INDEX_VERSION)):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return f"{path.stem[:60]}-{h.hexdigest()[:20]}.idx"


# ------------------------------------------------------------------------------------------------
# building

class _Builder:
    """One pass over a jsonl: parse + validate each line, count what needs no tokenizer (images,
    template pieces), batch the texts that do; the tokenizer runs on a thread, a block behind."""

    def __init__(self, path: Path, proc: Processor, images_dir: Path):
        self.path, self.proc, self.images_dir = path, proc, images_dir
        tok = proc.tokenizer
        self.encode = getattr(tok, "encode_batch_fast", tok.encode_batch)   # tokenizers < 0.20: no _fast
        self.pieces: dict[str, int] = {}      # template pieces (prompt chunks before the last tag) -> tokens
        self.images: dict[str, int | str] = {}     # image path -> its tokens, or why it is unusable
        self.ids: dict[str, int] = {}         # record id -> line of its first occurrence
        self.bad: list = []
        self.done: list = []                  # per block: (offsets, nbytes, lines, lengths)

    def piece(self, text: str) -> int:
        n = self.pieces.get(text)
        if n is None:
            n = self.pieces[text] = len(self.proc.encode(text, add_special_tokens=True))
        return n

    def image_tokens(self, rel: str) -> int | str:
        n = self.images.get(rel)
        if n is None:
            try:
                n = image_tokens(self.images_dir, rel, self.proc.num_crops)
            except ValueError as e:
                n = str(e)
            self.images[rel] = n
        return n

    def add(self, block: dict, line_no: int, offset: int, raw: bytes) -> None:
        """One line into the current block (or into `bad`, with its reason)."""
        where = f"{self.path}:{line_no}"
        try:
            rec = parse_line(raw, where)
            validate_record(rec, where)
            first = self.ids.setdefault(rec["id"], line_no)
            if first != line_no:
                raise ValueError(f"{where}: duplicate id {rec['id']!r}, first at {self.path}:{first}")
            fixed = 0
            for turn in rec["conversations"]:
                for rel in turn["images"]:
                    n = self.image_tokens(rel)
                    if isinstance(n, str):
                        raise ValueError(f"{where}: {n}")
                    fixed += n
                text = turn_prompt(self.proc, turn)
                # with images every chunk between tags is tokenized with its own BOS (the reference)
                chunks = IMAGE_TAG.split(text) if turn["images"] else [text]
                for c in chunks[:-1]:
                    fixed += self.piece(c)
                block["prompts"].append(chunks[-1])
                block["answers"].append(turn["assistant"] + ANSWER_SUFFIX)
                block["owner"].append(len(block["fixed"]))
        except ValueError as e:
            self.bad.append((line_no, str(e)))
            return
        block["fixed"].append(fixed)
        block["offsets"].append(offset)
        block["nbytes"].append(len(raw))
        block["lines"].append(line_no)

    def count(self, block: dict) -> dict:
        """The tokenizer's part of a block (runs on the thread): token counts per record."""
        prompts = self.encode(block["prompts"], add_special_tokens=True)
        answers = self.encode(block["answers"], add_special_tokens=False)
        per_turn = np.fromiter((len(p) + len(a) for p, a in zip(prompts, answers)), np.int64, len(prompts))
        n = len(block["fixed"])
        block["lengths"] = np.asarray(block["fixed"], np.int64) + np.bincount(
            np.asarray(block["owner"], np.int64), weights=per_turn, minlength=n).astype(np.int64)
        return block

    def finish(self, block: dict) -> None:
        self.done.append(tuple(np.asarray(block[k], dtype) for k, dtype in ARRAYS))

    def run(self, progress=None) -> Index:
        bar = progress(total=self.path.stat().st_size, unit="B", unit_scale=True) if progress else None
        pending = None
        with open(self.path, "rb") as f, ThreadPoolExecutor(1) as pool, tokenizer_on_one_thread():
            for block in self.blocks(f, bar):
                job = pool.submit(self.count, block)
                if pending is not None:
                    self.finish(pending.result())
                pending = job
            if pending is not None:
                self.finish(pending.result())
        if bar is not None:
            bar.close()
        parts = list(zip(*self.done)) or [[] for _ in ARRAYS]
        arrays = [np.concatenate(p).astype(dtype) if len(p) else np.zeros(0, dtype)
                  for p, (_, dtype) in zip(parts, ARRAYS)]
        return Index(*arrays, bad=self.bad)

    def blocks(self, f, bar):
        """Read BLOCK bytes at a time; every line (split at b"\\n" only, as schema.jsonl_lines does)
        goes through `add`; yields each filled block."""
        offset, line_no, rest = 0, 0, b""
        while True:
            data = f.read(BLOCK)
            if bar is not None:
                bar.update(len(data))
            buf = rest + data
            if data:
                cut = buf.rfind(b"\n") + 1
                if cut == 0:            # a line longer than BLOCK: read on
                    rest = buf
                    continue
                lines, rest = buf[:cut - 1].split(b"\n"), buf[cut:]
            else:
                lines = [buf] if buf else []          # a last line without its newline
            block = {"prompts": [], "answers": [], "owner": [], "fixed": [], "offsets": [], "nbytes": [], "lines": []}
            for raw in lines:
                line_no += 1
                if raw.strip():
                    self.add(block, line_no, offset, raw)
                offset += len(raw) + 1
            yield block
            if not data:
                return


@contextlib.contextmanager
def tokenizer_on_one_thread():
    """Batches tokenized on the calling thread, not in the tokenizers library's own thread pool,
    unless the user set TOKENIZERS_PARALLELISM: the index build already keeps both of a small
    machine's cores busy (parsing here, tokenizing on a thread), that pool keeps ~100 MB after the
    build, and processes forked after it ran (DataLoader workers) print a warning. The library reads
    the variable at each batch."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def build_index(path: Path, proc: Processor, images_dir: Path, progress=None) -> tuple[Index, dict]:
    """Index a jsonl from scratch -> (index, the images it refers to: path -> [size, mtime_ns])."""
    b = _Builder(path, proc, images_dir)
    index = b.run(progress)
    images = {rel: image_stat(images_dir / rel) for rel in sorted(b.images)}
    del b
    release_free_memory()
    return index, images


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; elsewhere a no-op).
    The build's transient buffers (the tokenizer's encodings, parsed lines) would otherwise stay in
    the process, and in every DataLoader worker forked from it, as if in use."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------
# the cache file: MAGIC, header length (u64), header JSON, the arrays, CRC-32 of all before it (u32)

def save_index(file: Path, index: Index, identity: dict) -> None:
    header = json.dumps({"version": INDEX_VERSION, "identity": identity, "n": len(index),
                         "bad": index.bad}).encode("utf-8", "surrogatepass")
    body = b"".join([MAGIC, struct.pack("<Q", len(header)), header]
                    + [np.ascontiguousarray(getattr(index, k), dtype).tobytes() for k, dtype in ARRAYS])
    write_atomic(file, lambda p: p.write_bytes(body + struct.pack("<I", zlib.crc32(body))))


def read_index(file: Path) -> tuple[Index, dict] | None:
    """(index, identity) from a cache file; None if it is missing, truncated, damaged or of another
    INDEX_VERSION."""
    try:
        buf = file.read_bytes()
    except OSError:
        return None
    if len(buf) < len(MAGIC) + 12 or not buf.startswith(MAGIC) \
            or struct.unpack("<I", buf[-4:])[0] != zlib.crc32(memoryview(buf)[:-4]):
        return None
    try:
        start = len(MAGIC) + 8
        (size,) = struct.unpack("<Q", buf[len(MAGIC):start])
        header = json.loads(buf[start:start + size].decode("utf-8", "surrogatepass"))
        if header["version"] != INDEX_VERSION:
            return None
        n, pos, arrays = header["n"], start + size, []
        for _, dtype in ARRAYS:
            arrays.append(np.frombuffer(buf, dtype, n, pos))
            pos += n * np.dtype(dtype).itemsize
        if pos != len(buf) - 4:
            return None
        return Index(*arrays, bad=[tuple(b) for b in header["bad"]], source="cache"), header["identity"]
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def is_current(identity: dict, path: Path, images_dir: Path) -> bool:
    """The jsonl and every image the cached index counted are as they were when it was built."""
    try:
        if identity["jsonl"] != file_fingerprint(path):
            return False
    except OSError:
        return False
    return all(image_stat(images_dir / rel) == st for rel, st in identity["images"].items())


def load_index(path: Path, proc: Processor, images_dir: Path, cache_dir=None, progress=None) -> Index:
    """The index of `path`: from the cache when it is current, else built (and cached).

    `cache_dir`: a directory, None for `default_cache_dir()`, False for no cache. Collective under a
    process group: local rank 0 loads or builds, then the other ranks load the file it left."""
    if cache_dir is False:
        return build_index(path, proc, images_dir, progress)[0]
    file = Path(cache_dir or default_cache_dir()) / cache_name(path, images_dir, proc)
    first = dist.local_rank() == 0
    index, failure = None, None
    if first:
        try:
            index = _cached(file, path, proc, images_dir, progress)
        except Exception as e:       # every rank must learn of it, or the others wait forever
            failure = e
    # every rank learns whether the builders succeeded (a barrier that carries their errors)
    errors = [e for e in dist.all_gather_object(None if failure is None else str(failure)) if e]
    if failure is not None:
        raise failure
    if errors:
        raise ValueError(errors[0])
    if not first:
        index = _cached(file, path, proc, images_dir, progress)
    return index


def _cached(file: Path, path: Path, proc: Processor, images_dir: Path, progress) -> Index:
    found = read_index(file)
    if found is not None and is_current(found[1], path, images_dir):
        return found[0]
    jsonl = file_fingerprint(path)
    index, images = build_index(path, proc, images_dir, progress)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_index(file, index, {"jsonl": jsonl, "images": images})
    except OSError as e:
        index.note = f"index cache not written ({e}); set --index_cache DIR or {CACHE_ENV} to a writable folder"
    return index
