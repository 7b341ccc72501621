"""Training data: jsonl records -> token ids + labels + crops, collation, packing and sampling.

Follows the recipe's `Phi3VDataset` (RECIPE §2.2, §6): each turn's user text gets
`<|image_1|>..<|image_n|>\\n` in front, goes through the chat template with the generation prompt
and the processor; the answer `assistant<|end|>\\n<|endoftext|>` is tokenized without special
tokens. Labels are -100 on every prompt token and the answer ids elsewhere; multi-turn records
train on every assistant turn.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import MAX_INPUT_ID, crop_grid_tokens, crop_grids
from .index import ANSWER_SUFFIX, image_file, load_index, turn_prompt
from .processor import Processor
from .schema import parse_line, validate_record



def load_image(path: Path, what: str) -> Image.Image:
    """Decode an image fully (so a corrupt file fails here, naming `what`, not deep in a worker)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:
        raise ValueError(f"{what}: cannot decode {path}: {e}") from None


class JsonlDataset(torch.utils.data.Dataset):
    """A jsonl file of the recipe's format, indexed up front (phi3v.index: exact token counts,
    malformed records found, cached), read line by line as samples are built.

    It holds no records: per usable record its byte offset and size, line number and exact length
    (`lengths`, numpy), so its memory and every forked worker's stay flat at any dataset size.
    `max_length`: samples longer than this are never truncated (that would cut an image run);
    they are dropped and counted (`n_dropped`, ids in `dropped`), or raise with `on_too_long="error"`.
    `on_bad_record="skip"` drops malformed records (listed in `self.skipped`) instead of raising.
    `cache_dir`: where the index is cached (None: $PHI3V_CACHE or ~/.cache/phi3v; False: no cache).
    """

    def __init__(self, path: str | Path, processor: Processor, images_dir: str | Path | None = None,
                 max_length: int | None = None, on_too_long: str = "drop", on_bad_record: str = "error",
                 progress=None, cache_dir: str | Path | None | bool = None):
        if on_too_long not in ("drop", "error") or on_bad_record not in ("error", "skip"):
            raise ValueError(f"bad policy on_too_long={on_too_long!r} on_bad_record={on_bad_record!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist")
        self.images_dir = Path(images_dir) if images_dir is not None else self.path.parent / "images"
        self.proc = processor
        self.skip_bad = on_bad_record == "skip"
        index = load_index(self.path, processor, self.images_dir, cache_dir, progress)
        self.index_source, self.cache_note = index.source, index.note
        self.skipped = [reason for _, reason in index.bad]    # "file:line: reason" of every malformed record
        long = index.lengths > max_length if max_length is not None else np.zeros(len(index), bool)
        # the first problem in file order decides, as a line-by-line reader would meet it
        first_bad = index.bad[0][0] if index.bad and not self.skip_bad else None
        first_long = int(np.argmax(long)) if on_too_long == "error" and long.any() else None
        self._fd = None
        if first_long is not None and (first_bad is None or index.lines[first_long] < first_bad):
            k = first_long
            rec = self._parse(int(index.offsets[k]), int(index.nbytes[k]), int(index.lines[k]))
            raise ValueError(f"{self.path}:{index.lines[k]}: sample {rec['id']!r} has {index.lengths[k]} tokens "
                             f"> max_length {max_length} (samples are never truncated inside image runs)")
        if first_bad is not None:
            raise ValueError(index.bad[0][1])
        keep = ~long
        self.offsets, self.nbytes = index.offsets[keep], index.nbytes[keep]     # [n] int64, int32
        self.lines, self.lengths = index.lines[keep], index.lengths[keep]       # [n] int32, int32
        self._dropped = (index.offsets[long], index.nbytes[long], index.lines[long])
        if not len(self):
            raise ValueError(f"{self.path}: no usable records ({len(self.skipped)} malformed, "
                             f"{self.n_dropped} longer than max_length)")

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def n_dropped(self) -> int:
        """Samples longer than max_length (dropped)."""
        return len(self._dropped[0])

    @property
    def dropped(self) -> list[str]:
        """Ids of the samples longer than max_length (read from the file on demand)."""
        return [self._parse(int(o), int(n), int(ln))["id"] for o, n, ln in zip(*self._dropped)]

    def __getstate__(self):           # a DataLoader worker opens the file itself
        return {**self.__dict__, "_fd": None}

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"

    def _parse(self, offset: int, nbytes: int, line: int) -> dict:
        if self._fd is None or self._fd[0] != os.getpid():        # opened once per process
            self._fd = (os.getpid(), open(self.path, "rb", buffering=0))
        f = self._fd[1]
        f.seek(offset)
        where = f"{self.path}:{line}"
        rec = parse_line(f.read(nbytes), where)
        validate_record(rec, where)          # the file may have changed since it was indexed
        return rec

    def record(self, i: int) -> tuple[str, dict]:
        """(file:line, the parsed record) of sample i."""
        return self.where(i), self._parse(int(self.offsets[i]), int(self.nbytes[i]), int(self.lines[i]))

    def __getitem__(self, i: int) -> dict | None:
        try:
            return self.build(i)
        except ValueError as e:
            if self.skip_bad:
                return {"skipped": str(e), "index": i}
            raise

    def build(self, i: int) -> dict:
        """Sample i: input_ids, labels, pixel_values, image_sizes; ValueError naming file:line if its
        line or an image cannot be read."""
        where, rec = self.record(i)
        ids, labels, pixels, sizes = [], [], [], []
        for turn in rec["conversations"]:
            images = [load_image(image_file(self.images_dir, rel, where), f"{where}: image {rel!r}")
                      for rel in turn["images"]]
            try:
                enc = self.proc(turn_prompt(self.proc, turn), images or None)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            prompt_ids = enc["input_ids"][0].tolist()
            answer = self.proc.encode(turn["assistant"] + ANSWER_SUFFIX)
            ids += prompt_ids + answer
            labels += [-100] * len(prompt_ids) + answer
            if images:
                pixels.append(enc["pixel_values"])
                sizes.append(enc["image_sizes"])
        if len(ids) != self.lengths[i]:
            raise ValueError(f"{where}: sample has {len(ids)} tokens, {self.lengths[i]} were counted when the "
                             "data was indexed (image changed on disk?)")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": torch.cat(pixels) if pixels else None,
                "image_sizes": torch.cat(sizes) if sizes else None, "index": rec["id"]}


def training_inputs(input_ids: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor | None = None,
                    image_sizes: torch.Tensor | None = None, causal: bool | None = None) -> dict:
    """Everything data-dependent the training forward needs, computed here on the CPU so that
    `Phi3V.hidden_packed` + `chunked_ce` + backward never read a device value (no host syncs).

    input_ids, doc_ids, labels [B, T]; doc_ids numbers the samples inside each row (padding is a
    document of its own). Returns input_ids, doc_ids, position_ids (restarting in every document),
    doc_lens (each token's document length: it picks the LongRoPE factors), `causal` (plain causal
    attention is exact: one sample per row, maybe followed by padding, which no real token sees;
    None = infer from doc_ids), `image_index` ([2, n]: row and column of every image placeholder,
    row-major) and `crops` ((rows, cols) of sub-crops per image), and with labels `target_index`
    (flat positions whose next token is supervised) and `targets` (those next tokens).
    """
    b, t = input_ids.shape
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(t).expand(b, t)
    start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), dim=1).values
    counts = torch.zeros(b, int(doc_ids.max()) + 1, dtype=torch.long).scatter_add_(1, doc_ids, torch.ones_like(doc_ids))
    out = {"input_ids": input_ids, "doc_ids": doc_ids, "position_ids": idx - start,
           "doc_lens": counts.gather(1, doc_ids),
           "causal": bool((doc_ids == doc_ids[:, :1]).all()) if causal is None else causal,
           "image_index": None, "crops": None}
    is_img = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
    if image_sizes is not None:
        crops = crop_grids(image_sizes)
        n_feats = sum(crop_grid_tokens(h, w) for h, w in crops)
        if n_feats != int(is_img.sum()):
            raise ValueError(f"input_ids hold {int(is_img.sum())} image placeholders but the images give "
                             f"{n_feats} features")
        out["image_index"], out["crops"] = is_img.nonzero().T.contiguous(), crops     # [2, n]: rows, cols
    elif is_img.any():
        raise ValueError("input_ids hold image placeholders but image_sizes was not given")
    if labels is not None:
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]                         # position p predicts token p+1
        nxt = nxt.flatten()
        out["target_index"] = (nxt != -100).nonzero()[:, 0]
        out["targets"] = nxt[out["target_index"]]
    return out


def collate(samples: list[dict], pad_id: int, pack: bool = False) -> dict:
    """Samples -> one micro-batch, with the forward's inputs prepared on the CPU (training_inputs).

    Right padding (rows = samples), or with `pack` one row holding every sample back to back
    (no padding at all; attention then needs the block-causal mask). pixel_values/image_sizes are
    concatenated in row-major placeholder order. `n_targets` is the number of supervised tokens,
    `n_tokens` the number of positions (pads included).
    """
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    if not samples:
        return {"skipped": skipped, "n_samples": 0}
    if pack:
        input_ids = torch.cat([s["input_ids"] for s in samples])[None]
        labels = torch.cat([s["labels"] for s in samples])[None]
        doc = torch.cat([torch.full_like(s["input_ids"], j) for j, s in enumerate(samples)])[None]
    else:
        t = max(len(s["input_ids"]) for s in samples)
        b = len(samples)
        input_ids = torch.full((b, t), pad_id, dtype=torch.long)
        labels = torch.full((b, t), -100, dtype=torch.long)
        doc = torch.ones(b, t, dtype=torch.long)
        for j, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[j, :n], labels[j, :n], doc[j, :n] = s["input_ids"], s["labels"], 0
    pv = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    sz = [s["image_sizes"] for s in samples if s["image_sizes"] is not None]
    sizes = torch.cat(sz) if sz else None
    out = training_inputs(input_ids, doc, labels, sizes, causal=not pack or len(samples) == 1)
    return {**out, "labels": labels, "pixel_values": torch.cat(pv) if pv else None, "image_sizes": sizes,
            "n_targets": int(out["targets"].numel()), "n_tokens": int(input_ids.numel()),
            "n_samples": len(samples), "skipped": skipped, "ids": [s["index"] for s in samples]}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; non-blocking, so a pinned batch (the loader pins on CUDA) is
    copied while the GPU still works on the previous one. Other entries stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class StepSampler:
    """Deterministic, resumable sampling: optimizer step -> this rank's micro-batches of indices.

    Every epoch is a seeded permutation of the dataset (computed once per epoch) cut into global
    batches of `batch_size` samples (the last one may be smaller). A global batch is sorted by length
    (length grouping: similar lengths share a micro-batch, little padding), cut into micro-batches,
    and these are dealt round-robin to the ranks. The state is just the step counter; a step costs
    O(batch_size log batch_size), whatever the dataset's size.
    """

    def __init__(self, lengths, batch_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.lengths = np.asarray(lengths)         # [n]
        self.batch_size, self.micro = batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.steps_per_epoch = math.ceil(len(self.lengths) / batch_size)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the sample indices [n] (seed and epoch decide it)."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._order = epoch, rng.permutation(len(self.lengths))
        return self._order

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches for optimizer step `step` (may be empty for a short last batch)."""
        idx = np.asarray(self.global_batch(step), dtype=np.int64)
        idx = idx[np.lexsort((idx, -self.lengths[idx].astype(np.int64)))].tolist()    # longest first, then index
        micro = [idx[j:j + self.micro] for j in range(0, len(idx), self.micro)]
        return micro[self.rank::self.world]

    def n_micro_batches(self, step: int) -> int:
        """len(micro_batches(step)), by arithmetic."""
        k = step % self.steps_per_epoch
        size = min(self.batch_size, len(self.lengths) - k * self.batch_size)
        return len(range(self.rank, math.ceil(size / self.micro), self.world))

    def batches(self, start_step: int, total_steps: int):
        """All micro-batches of steps start_step..total_steps-1, in order (a DataLoader batch_sampler)."""
        for step in range(start_step, total_steps):
            yield from self.micro_batches(step)


class StepBatchSampler(torch.utils.data.Sampler):
    """`StepSampler.batches` as a torch batch sampler (so DataLoader workers prefetch ahead)."""

    def __init__(self, sampler: StepSampler, start_step: int, total_steps: int):
        self.s, self.start, self.total = sampler, start_step, total_steps

    def __iter__(self):
        return self.s.batches(self.start, self.total)

    def __len__(self) -> int:
        """Arithmetic: every epoch's last step (maybe a short batch) and the full steps between."""
        s, m = self.s, self.s.steps_per_epoch
        lasts = self.total // m - self.start // m          # steps k in [start, total) with k % m == m - 1
        return (self.total - self.start - lasts) * s.n_micro_batches(0) + lasts * s.n_micro_batches(m - 1)
