"""The canonical jsonl record (CONTRACT.md "Data format") and its validator.

One record per line:
    {"id": str, "source": str,
     "conversations": [{"images": [path, ...], "user": str, "assistant": str}, ...]}
Image paths are relative to the `images/` folder beside the jsonl. The user text holds no
`<|image_k|>` tags: the training dataset puts `<|image_1|>...<|image_n|>\\n` in front of it.
Extra top-level fields are allowed (e.g. DocVQA's "answers"). Records only to be answered (a test
split, `python -m phi3v.generate --data`) may leave the last turn's "assistant" out. The training
data pipeline, the evaluation and the converters (convert/) all read and write records through
this module.
"""
import json

from .processor import IMAGE_TAG


def make_record(id: str, source: str, conversations: list, **extra) -> dict:
    """A record with the fixed key order id, source, conversations, then extras (sorted)."""
    rec = {"id": id, "source": source, "conversations": conversations}
    for key in sorted(extra):
        rec[key] = extra[key]
    return rec


def make_turn(images: list, user: str, assistant: str) -> dict:
    """One conversation turn with the fixed key order images, user, assistant."""
    return {"images": list(images), "user": user, "assistant": assistant}


def _fail(where: str, field: str, msg: str):
    raise ValueError(f"{where}: field '{field}': {msg}")


def _check_image_path(p, where: str, field: str):
    if not isinstance(p, str) or not p:
        _fail(where, field, f"expected a non-empty path string, got {p!r}")
    # as PurePosixPath(p).is_absolute() / .parts, in string operations (this runs for every image of
    # every record when a dataset is indexed)
    if "\\" in p or p.startswith("/") or ".." in p.split("/"):
        _fail(where, field, f"image path must be relative to images/ without '..', got {p!r}")


def validate_record(obj, where: str, unanswered: bool = False) -> None:
    """Raise ValueError naming `where` (file:line) and the field when `obj` is not a valid record.

    Training needs every turn's answer. With `unanswered=True` (answering a test split) the last
    turn's "assistant" may be missing, null or empty: nothing to score. Earlier turns still need
    theirs: they are the conversation's history."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "source"):
        if key not in obj:
            _fail(where, key, "missing")
        if not isinstance(obj[key], str) or not obj[key]:
            _fail(where, key, f"expected a non-empty string, got {obj[key]!r}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        _fail(where, "conversations", f"expected a non-empty list, got {convs!r}")
    for t, turn in enumerate(convs):
        f = f"conversations[{t}]"
        if not isinstance(turn, dict):
            _fail(where, f, f"expected an object, got {type(turn).__name__}")
        optional = unanswered and t == len(convs) - 1
        for key in ("images", "user") + (() if optional else ("assistant",)):
            if key not in turn:
                _fail(where, f"{f}.{key}", "missing")
        if not isinstance(turn["images"], list):
            _fail(where, f"{f}.images", f"expected a list, got {type(turn['images']).__name__}")
        for i, p in enumerate(turn["images"]):
            _check_image_path(p, where, f"{f}.images[{i}]")
        if not isinstance(turn["user"], str):
            _fail(where, f"{f}.user", f"expected a string, got {type(turn['user']).__name__}")
        tag = IMAGE_TAG.search(turn["user"])
        if tag:
            _fail(where, f"{f}.user", f"holds the image tag {tag.group()!r}; "
                  "tags are added by the training dataset, leave them out")
        answer = turn.get("assistant")
        if optional and (answer is None or (isinstance(answer, str) and not answer.strip())):
            continue
        if not isinstance(answer, str) or not answer.strip():
            _fail(where, f"{f}.assistant", f"expected a non-empty string, got {answer!r}"
                  + (" (only the last turn may be unanswered)" if unanswered and not optional else ""))


def jsonl_lines(path):
    """Yield (line_no, raw bytes) for each non-blank line of a jsonl file (lines end at \\n only,
    so a U+2028 inside a string never splits a record). Decode and parse with `parse_line`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield line_no, raw


def parse_line(raw: bytes, where: str):
    """One jsonl line -> its JSON value; ValueError naming `where` (file:line) if the line is not
    UTF-8 or not JSON. A byte-order mark (first line of some editors' files) is ignored."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None
    try:
        return json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def iter_jsonl(path):
    """Yield (line_no, record) for each non-blank line; ValueError names path:line on a line that
    is not UTF-8 JSON. Records are parsed, not validated: call validate_record(rec, f"{path}:{line_no}").
    """
    for line_no, raw in jsonl_lines(path):
        yield line_no, parse_line(raw, f"{path}:{line_no}")
