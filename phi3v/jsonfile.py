"""Reading the JSON files of checkpoints and adapters (config.json, adapter_config.json, the
safetensors index, the tokenizer and preprocessor configs): one reader, and typed field access
whose errors name the file and the field. Each file's format is validated where it is read
(config.py, lora.py, hf.py, processor.py) with these helpers. Also atomic file writes.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

MISSING = object()


def write_atomic(path: str | Path, write) -> None:
    """Create or replace a file whole or not at all: `write(tmp_path)` writes a temporary file
    beside it, which is then renamed over `path`. A kill mid-write never leaves a truncated file
    under the final name (the leftover `.name.*.tmp` is removed on errors)."""
    path = Path(path)
    # not tempfile.mkstemp: its files are private (0600); this one gets the umask's mode, as open() would
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_atomic` for UTF-8 text ('\n' line ends on every platform)."""
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8", newline="\n"))


def finite(value):
    """`value` with every non-finite float (nan, inf) in it, also inside dicts and lists, replaced by
    None: what strict JSON can hold (`json.dumps(..., allow_nan=False)` accepts the result)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One line of a .jsonl file: strict JSON (non-finite numbers as null, never NaN or Infinity)."""
    return json.dumps(finite(record), allow_nan=False) + "\n"


def read_json(path: str | Path):
    """The parsed content of a JSON file; ValueError naming the file if it is not UTF-8 JSON.
    A missing file raises FileNotFoundError (the caller knows what it was looking for)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a JSON file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def show(value) -> str:
    """A short JSON spelling of a value for error messages."""
    try:
        s = json.dumps(value)
    except (TypeError, ValueError):
        s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


class Fields:
    """Typed reads of one JSON object's fields. `where` names the file; nested objects (`object`)
    carry the dotted prefix, so an error reads "<file>: field 'vision_config.patch_size' must be ..."."""

    def __init__(self, obj, where: str, prefix: str = ""):
        if not isinstance(obj, dict):
            what = f"field '{prefix[:-1]}'" if prefix else "the top level"
            raise ValueError(f"{where}: {what} must be a JSON object, got {show(obj)}")
        self.obj, self.where, self.prefix = obj, where, prefix

    def fail(self, key: str, msg: str):
        raise ValueError(f"{self.where}: field '{self.prefix}{key}' {msg}")

    def __contains__(self, key: str) -> bool:
        return key in self.obj

    def _get(self, key: str, default, null: bool):
        """(True, value) if the field is given, (False, default) if it is absent (or null, with
        `null=True`); an error if it is absent and required (no default)."""
        v = self.obj.get(key, MISSING)
        if v is MISSING or (v is None and null):
            if default is MISSING:
                self.fail(key, "is missing")
            return False, default
        return True, v

    def value(self, key: str, default=MISSING, null: bool = False):
        """The raw value, or `default`."""
        return self._get(key, default, null)[1]

    def int(self, key: str, default=MISSING, min: int | None = 1, null: bool = False) -> int:
        given, v = self._get(key, default, null)
        if given and (isinstance(v, bool) or not isinstance(v, int) or (min is not None and v < min)):
            self.fail(key, f"must be an integer{f' >= {min}' if min is not None else ''}, got {show(v)}")
        return v

    def number(self, key: str, default=MISSING, min: float | None = None, above: float | None = None,
               max: float | None = None, below: float | None = None, null: bool = False) -> int | float:
        """A finite int or float (returned as given) within [min, max] and (above, below), where given."""
        given, v = self._get(key, default, null)
        if not given:
            return v
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        bounds = [(min, ">=", lambda a, b: a >= b), (above, ">", lambda a, b: a > b),
                  (max, "<=", lambda a, b: a <= b), (below, "<", lambda a, b: a < b)]
        rng = [f"{op} {b:g}" for b, op, _ in bounds if b is not None]
        if not ok or not all(test(v, b) for b, _, test in bounds if b is not None):
            self.fail(key, f"must be a number{' ' + ' and '.join(rng) if rng else ''}, got {show(v)}")
        return v

    def string(self, key: str, default=MISSING, null: bool = False) -> str:
        given, v = self._get(key, default, null)
        if given and not isinstance(v, str):
            self.fail(key, f"must be a string, got {show(v)}")
        return v

    def boolean(self, key: str, default=MISSING, null: bool = False) -> bool:
        given, v = self._get(key, default, null)
        if given and not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {show(v)}")
        return v

    def numbers(self, key: str, default=MISSING, above: float | None = None) -> tuple[float, ...]:
        """A list of finite numbers (each > `above`, where given)."""
        given, v = self._get(key, default, False)
        if not given:
            return v
        if not isinstance(v, list) or not all(not isinstance(x, bool) and isinstance(x, (int, float))
                                              and math.isfinite(x) and (above is None or x > above) for x in v):
            self.fail(key, f"must be a list of numbers{f' > {above:g}' if above is not None else ''}, got {show(v)}")
        return tuple(float(x) for x in v)

    def object(self, key: str, default=MISSING, null: bool = False) -> "Fields | None":
        """A nested object as Fields (its errors name `key.field`), or `default`."""
        given, v = self._get(key, default, null)
        return Fields(v, self.where, f"{self.prefix}{key}.") if given else v
