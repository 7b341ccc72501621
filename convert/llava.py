"""LLaVA-format json -> our jsonl (OUT/{input stem}.jsonl) + OUT/images/.

    python -m convert.llava --src llava_instruct.json --out_dir OUT [--image_folder DIR] [--source NAME]

Input: a JSON list (or jsonl) of {"id", "image": "x.jpg" | [..], "conversations": [{"from": "human"
| "gpt", "value": "<image>\\n..."}]}. Turns are human/gpt pairs (a leading "system" message goes to
the extra field "system"). Each `<image>` placeholder is removed from the text (with its adjacent
newline) and the images, in order, attach to the turn where their placeholders appear; a record
with images but no placeholder attaches them all to the first turn. Image paths are relative to
--image_folder (default: the json's folder) and keep that relative path under OUT/images/.
Records whose placeholder count differs from their image count, or that do not alternate
human/gpt, are skipped and reported. A missing id becomes "{stem}-{index:08d}".
"""
from pathlib import Path

from phi3v.schema import make_record, make_turn

from .common import (chat_file_options, cli, convert_chat_file, item_id, local_image, pair_turns,
                     strip_placeholders)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_record(item, index: int, stem: str, source: str, folder: Path) -> tuple:
    """(record, {rel: source path}) for one LLaVA item; ValueError says why it cannot be converted."""
    if not isinstance(item, dict):
        raise ValueError("item is not an object")
    rid = item_id(item, index, stem)
    key = "image" if "image" in item else "images"
    image = item.get(key)
    paths = [image] if isinstance(image, str) else image if image is not None else []
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"'{key}' must be an image path or a list of image paths, got {image!r:.80}")
    convs = item.get("conversations")
    if not isinstance(convs, list):
        raise ValueError(f"'conversations' must be a list of messages, got {convs!r:.80}")
    msgs = []
    for m in convs:
        role = ROLES.get(str(m.get("from", "")).lower()) if isinstance(m, dict) else None
        if role is None or not isinstance(m.get("value"), str):
            raise ValueError(f"message {m!r:.80}: 'from' must be human/gpt/system with a string 'value'")
        msgs.append((role, m["value"]))
    system, pairs = pair_turns(msgs)
    counts = [u.count("<image>") for u, _ in pairs]
    if any("<image>" in a for _, a in pairs):
        raise ValueError("<image> placeholder in an assistant message")
    if sum(counts) == 0 and paths:
        counts[0] = len(paths)
    if sum(counts) != len(paths):
        raise ValueError(f"{sum(counts)} <image> placeholder(s) but {len(paths)} image(s)")
    images, turns, k = {}, [], 0
    for (user, assistant), n in zip(pairs, counts):
        rels = []
        for p in paths[k:k + n]:
            rel, src = local_image(str(p), folder)
            rels.append(rel)
            images[rel] = src
        k += n
        turns.append(make_turn(rels, strip_placeholders(user), assistant.strip()))
    extra = {"system": system} if system is not None else {}
    return make_record(rid, source, turns, **extra), images


def convert(src, out_dir, image_folder=None, source: str = "llava", strict: bool = False,
            progress: bool = False) -> dict:
    """Convert one LLaVA json/jsonl file; returns stats."""
    return convert_chat_file(src, out_dir, to_record, image_folder, source, strict, progress)


if __name__ == "__main__":
    cli(convert, __doc__, *chat_file_options("llava"))
