"""ShareGPT / OpenAI-messages json -> our jsonl (OUT/{input stem}.jsonl) + OUT/images/.

    python -m convert.sharegpt --src data.json --out_dir OUT [--image_folder DIR] [--source NAME]

Input: a JSON list (or jsonl) of {"id"?, "messages": [{"role": "system"|"user"|"assistant",
"content": str | [parts]}], "images"?: [...]} ("conversations" is accepted for "messages").
Content parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"} | str},
{"type": "image", "image" | "url" | "path": str}. An image is a local path (relative to
--image_folder, default the json's folder; kept under OUT/images/), a file:// URL, or a base64
data: URL (written as OUT/images/{stem}/{sha1 prefix}.{ext}); http(s) URLs cannot be fetched
offline and skip the record. String content may instead use `<image>` placeholders that take the
item's top-level "images" in order (the LLaMA-Factory sharegpt layout). Text parts of one message
are joined with "\\n"; a text that is not a string (a null, a number) skips the item, naming the
field. A leading system message goes to the extra field "system". A missing id becomes
"{stem}-{index:08d}".
"""
from pathlib import Path

from phi3v.jsonfile import show
from phi3v.schema import make_record, make_turn

from .common import (chat_file_options, cli, content_name, convert_chat_file, decode_data_url, image_ext, item_id,
                     local_image, pair_turns, strip_placeholders, text_field)


def _image(ref, stem: str, folder: Path) -> tuple:
    """(rel path, source) for an image reference (str or {"url": ...})."""
    if isinstance(ref, dict):
        ref = ref.get("url") or ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image part without a path or URL: {ref!r:.80}")
    if ref.startswith("data:"):
        data = decode_data_url(ref)
        ext = image_ext(data)
        if ext is None:
            raise ValueError("data: URL does not hold a decodable image")
        return f"{stem}/{content_name(data)}.{ext}", data
    if ref.startswith(("http://", "https://")):
        raise ValueError(f"remote image URL cannot be fetched offline: {ref}")
    return local_image(ref, folder)


def _content(content, stem: str, folder: Path, pool: list, field: str) -> tuple:
    """(text, [(rel, source)]) of one message; `pool` feeds `<image>` placeholders in string content.
    `field` names the content in errors ("messages[1].content")."""
    if isinstance(content, str):
        n = content.count("<image>")
        if n > len(pool):
            raise ValueError(f"{n} <image> placeholder(s) but only {len(pool)} image(s) left in 'images'")
        refs = [pool.pop(0) for _ in range(n)]
        return strip_placeholders(content), [_image(r, stem, folder) for r in refs]
    if not isinstance(content, list):
        raise ValueError(f"field {field!r}: expected a string or a list of parts, got {show(content)}")
    texts, images = [], []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(text_field(part, "text", f"{field}[{k}].text"))
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), stem, folder))
        elif kind == "image":
            images.append(_image(part.get("image") or part.get("url") or part.get("path"), stem, folder))
        else:
            raise ValueError(f"unknown content part {part!r:.80}")
    return "\n".join(t.strip() for t in texts).strip(), images


def to_record(item, index: int, stem: str, source: str, folder: Path) -> tuple:
    """(record, {rel: source}) for one item; ValueError says why it cannot be converted."""
    if not isinstance(item, dict):
        raise ValueError("item is not an object")
    rid = item_id(item, index, stem)
    pool = item.get("images")
    pool = [] if pool is None else pool
    if not isinstance(pool, list):
        raise ValueError(f"'images' must be a list, got {pool!r:.80}")
    pool = list(pool)
    key = "messages" if "messages" in item else "conversations"
    messages = item.get(key)
    if not isinstance(messages, list):
        raise ValueError(f"'{key}' must be a list of messages, got {messages!r:.80}")
    msgs = []
    for j, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {m!r:.80}: role must be system/user/assistant")
        text, images = _content(m.get("content"), stem, folder, pool, f"{key}[{j}].content")
        if images and role != "user":
            raise ValueError(f"image in a {role} message")
        msgs.append((role, (text, images)))
    if pool:
        raise ValueError(f"{len(pool)} image(s) in 'images' without an <image> placeholder")
    system, pairs = pair_turns(msgs)
    images, turns = {}, []
    for (user, ims), (answer, _) in pairs:
        turns.append(make_turn([rel for rel, _ in ims], user, answer))
        images.update(dict(ims))
    extra = {"system": system[0]} if system is not None else {}
    return make_record(rid, source, turns, **extra), images


def convert(src, out_dir, image_folder=None, source: str = "sharegpt", strict: bool = False,
            progress: bool = False) -> dict:
    """Convert one ShareGPT/OpenAI-messages json/jsonl file; returns stats."""
    return convert_chat_file(src, out_dir, to_record, image_folder, source, strict, progress)


if __name__ == "__main__":
    cli(convert, __doc__, *chat_file_options("sharegpt"))
