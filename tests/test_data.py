"""Data pipeline: records -> samples, labels, collation, packing, sampling, chunked loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from phi3v import Phi3V, Processor
from phi3v.data import ANSWER_SUFFIX, JsonlDataset, StepSampler, collate, training_inputs
from phi3v.loss import chunked_ce


@pytest.fixture(scope="module")
def proc(demo_dir):
    return Processor.from_pretrained(demo_dir / "model")


@pytest.fixture(scope="module")
def model(demo_dir):
    return Phi3V.from_pretrained(demo_dir / "model")


def per_sample_ce(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                  doc_ids: torch.Tensor) -> dict[tuple[int, int], float]:
    """(row, document) -> mean CE of that sample's supervised tokens (the packed-vs-alone check)."""
    with torch.no_grad():
        logits = lm_head(hidden[:, :-1]).float()
        tgt = labels[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
        keep = tgt != -100
        out = {}
        for b in range(labels.shape[0]):
            for d in doc_ids[b, 1:][keep[b]].unique().tolist():
                m = keep[b] & (doc_ids[b, 1:] == d)
                out[(b, d)] = float(ce[b][m].mean())
        return out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_sample_layout(demo_dir, proc):
    ds = JsonlDataset(demo_dir / "data" / "ucf101_train.jsonl", proc)
    s = ds[0]
    rec = ds.record(0)[1]["conversations"][0]
    ids, labels = s["input_ids"], s["labels"]
    answer = proc.encode(rec["assistant"] + ANSWER_SUFFIX)
    # the prompt is exactly what the processor gives for the templated user turn with 8 image tags
    prompt = proc.apply_chat_template([{"role": "user", "content": "".join(
        f"<|image_{k}|>" for k in range(1, 9)) + "\n" + rec["user"]}])
    images = [str(demo_dir / "data" / "images" / p) for p in rec["images"]]
    enc = proc(prompt, images)
    assert ids.tolist() == enc["input_ids"][0].tolist() + answer
    assert labels.tolist() == [-100] * enc["input_ids"].shape[1] + answer
    assert answer[-4:] == [proc.end_token_id, *proc.encode("\n"), proc.eos_token_id]   # <|end|> ▁ \n <|endoftext|>
    assert torch.equal(s["pixel_values"], enc["pixel_values"])
    assert len(ids) == ds.lengths[0]           # header-based count equals the real sample


def test_multi_turn_trains_every_answer(demo_dir, proc, tmp_path):
    rec = {"id": "m", "source": "t", "conversations": [
        {"images": ["train/Ball/v_Ball_g01_c01.0.jpg"], "user": "What is it?", "assistant": "Ball"},
        {"images": [], "user": "Colour?", "assistant": "red"}]}
    f = write_jsonl(tmp_path / "x.jsonl", [rec])
    ds = JsonlDataset(f, proc, images_dir=demo_dir / "data" / "images")
    s = ds[0]
    sup = s["labels"][s["labels"] != -100].tolist()
    assert sup == proc.encode("Ball" + ANSWER_SUFFIX) + proc.encode("red" + ANSWER_SUFFIX)
    assert s["pixel_values"].shape[0] == 1 and len(s["input_ids"]) == ds.lengths[0]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"x.jsonl:2: invalid JSON"),
    (json.dumps({"id": "a", "source": "s", "conversations": [{"images": [], "user": "q"}]}),
     r"x.jsonl:2: .*assistant"),
    (json.dumps({"id": "a", "source": "s", "conversations": [{"images": ["nope.jpg"], "user": "q",
                                                              "assistant": "a"}]}), r"x.jsonl:2: image 'nope.jpg' not found"),
    (json.dumps({"id": "a", "source": "s", "conversations": [{"images": [], "user": "<|image_1|> q",
                                                              "assistant": "a"}]}), r"x.jsonl:2: .*image tag"),
])
def test_bad_records_name_file_and_line(demo_dir, proc, tmp_path, line, message):
    good = json.loads((demo_dir / "data" / "ucf101_train.jsonl").read_text().splitlines()[0])
    f = write_jsonl(tmp_path / "x.jsonl", [good, line])
    with pytest.raises(ValueError, match=message):
        JsonlDataset(f, proc, images_dir=demo_dir / "data" / "images")
    ds = JsonlDataset(f, proc, images_dir=demo_dir / "data" / "images", on_bad_record="skip")
    assert len(ds) == 1 and len(ds.skipped) == 1 and "x.jsonl:2" in ds.skipped[0]


def test_corrupt_image_is_reported(demo_dir, proc, tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    (img_dir / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    rec = {"id": "c", "source": "s", "conversations": [{"images": ["bad.jpg"], "user": "q", "assistant": "a"}]}
    f = write_jsonl(tmp_path / "x.jsonl", [rec])
    with pytest.raises(ValueError, match=r"x.jsonl:1: cannot open image 'bad.jpg'"):
        JsonlDataset(f, proc)


def test_too_long_dropped_or_error_never_truncated(demo_dir, proc):
    f = demo_dir / "data" / "ucf101_train.jsonl"
    full = JsonlDataset(f, proc)
    limit = sorted(full.lengths)[len(full) // 2]
    ds = JsonlDataset(f, proc, max_length=limit)
    assert len(ds) + len(ds.dropped) == len(full) and all(n <= limit for n in ds.lengths)
    with pytest.raises(ValueError, match="max_length"):
        JsonlDataset(f, proc, max_length=limit - 1, on_too_long="error")


def test_collate_right_padding_and_images_in_order(demo_dir, proc):
    ds = JsonlDataset(demo_dir / "data" / "ucf101_train.jsonl", proc)
    a, b = ds[0], ds[1]
    b = {**b, "input_ids": b["input_ids"][:-3], "labels": b["labels"][:-3]}   # make lengths differ
    batch = collate([a, b], pad_id=proc.pad_token_id)
    t = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, t)
    assert (batch["input_ids"][1, len(b["input_ids"]):] == proc.pad_token_id).all()
    assert (batch["labels"][1, len(b["input_ids"]):] == -100).all()
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
    packed = collate([a, b], pad_id=proc.pad_token_id, pack=True)
    assert packed["input_ids"].shape == (1, len(a["input_ids"]) + len(b["input_ids"]))
    assert packed["doc_ids"][0].tolist() == [0] * len(a["input_ids"]) + [1] * len(b["input_ids"])


def test_packed_loss_equals_unpacked(demo_dir, proc, model):
    ds = JsonlDataset(demo_dir / "data" / "ucf101_train.jsonl", proc)
    samples = [ds[i] for i in range(3)]
    with torch.no_grad():
        single = []
        for s in samples:
            b = collate([s], proc.pad_token_id)
            h = model.hidden_packed(b)
            single.append(per_sample_ce(h, model.lm_head, b["labels"], b["doc_ids"])[(0, 0)])
        b = collate(samples, proc.pad_token_id, pack=True)
        assert not b["causal"]                      # three samples in one row: the block mask
        packed = per_sample_ce(model.hidden_packed(b), model.lm_head, b["labels"], b["doc_ids"])
        b2 = collate(samples, proc.pad_token_id)
        assert b2["causal"]                         # right padding: plain causal attention
        padded = per_sample_ce(model.hidden_packed(b2), model.lm_head, b2["labels"], b2["doc_ids"])
    for j in range(3):
        assert abs(packed[(0, j)] - single[j]) < 1e-5
        assert abs(padded[(j, 0)] - single[j]) < 1e-5


def test_chunked_ce_matches_full_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    inputs = training_inputs(labels.clamp(min=0), torch.zeros_like(labels), labels)
    loss = chunked_ce(h, head, inputs["target_index"], inputs["targets"], chunk=3)
    ref = F.cross_entropy(head(h)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum")
    assert inputs["targets"].numel() == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, [h, head.weight])
    g2 = torch.autograd.grad(ref, [h, head.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_loss_normalisation_independent_of_micro_batching(demo_dir, proc, model):
    """The gradient of (sum CE / global supervised tokens) is the same for any micro-batch split."""
    ds = JsonlDataset(demo_dir / "data" / "ucf101_train.jsonl", proc)
    samples = [ds[i] for i in range(4)]
    w = model.lm_head.weight

    def grad(split):
        w.grad = None
        model.lm_head.requires_grad_(True)
        total = 0
        for part in split:
            b = collate(part, proc.pad_token_id)
            with torch.no_grad():
                h = model.hidden_packed(b)
            chunked_ce(h, model.lm_head, b["target_index"], b["targets"]).backward()
            total += b["n_targets"]
        g = w.grad / total
        model.lm_head.requires_grad_(False)
        return g

    g1 = grad([samples])
    g2 = grad([samples[:1], samples[1:3], samples[3:]])
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_step_sampler_deterministic_and_complete():
    lengths = [10 + (i * 7) % 13 for i in range(23)]
    one = StepSampler(lengths, batch_size=6, micro_batch_size=2, seed=3)
    assert one.steps_per_epoch == 4
    for step in range(8):
        parts = [StepSampler(lengths, 6, 2, r, 3, seed=3).micro_batches(step) for r in range(3)]
        flat = sorted(i for p in parts for mb in p for i in mb)
        assert flat == sorted(one.global_batch(step))            # the ranks share the global batch
        assert one.micro_batches(step) == StepSampler(lengths, 6, 2, seed=3).micro_batches(step)
    epoch0 = sorted(i for s in range(4) for i in one.global_batch(s))
    assert epoch0 == list(range(23))                              # every sample once per epoch
    assert one.global_batch(4) != one.global_batch(0)             # reshuffled next epoch
    # resuming at step k yields exactly the tail of the uninterrupted sequence
    assert list(one.batches(3, 8)) == list(one.batches(0, 8))[len(list(one.batches(0, 3))):]
