"""Processor parity with the reference (../shared/golden) and its handling of bad input."""
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.processor import (CLIP_MEAN, CLIP_STD, ImageProcessor, Processor, hd_size,
                             num_image_tokens, tokens_for_hd_size)

PIXEL_ATOL = 1e-5  # golden README: reference is pure float32, expect <= 1e-6
TEXT_BATCH_CASES = {"pp_text_batch_padding_left", "pp_text_batch_padding_right"}  # not a processor API


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cases_dir(golden_dir):
    return golden_dir / "cases"


@pytest.fixture(scope="module")
def cases(cases_dir):
    return json.loads((cases_dir / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tiny_proc(golden_dir):
    return Processor.from_pretrained(golden_dir / "tiny-phi3v")


@pytest.fixture(scope="module")
def real_proc(golden_dir):
    return Processor.from_pretrained(golden_dir / "phi3-tokenizer")


@pytest.fixture(scope="module")
def processors(golden_dir):
    """Image processors by num_crops, shared by the parity tests."""
    return {n: ImageProcessor(num_crops=n) for n in (1, 4, 9, 16)}


def _open(cases_dir, rel):
    return Image.open(cases_dir / rel)


def _of_kind(cases, kind):
    found = [c for c in cases if c["kind"] == kind]
    assert found, f"no golden cases of kind {kind}"
    return found


# ----------------------------------------------------------------------------- image processor


def test_image_processor_golden(cases, cases_dir, processors):
    report = []
    for case in _of_kind(cases, "image_processor"):
        ip = processors[case["num_crops"]]
        names = case.get("images") or [case["image"]]
        out = ip([_open(cases_dir, n) for n in names])
        ref = np.load(cases_dir / case["file"])
        name = case["name"]
        assert out["pixel_values"].dtype == torch.float32
        assert out["image_sizes"].dtype == torch.int64 and out["num_img_tokens"].dtype == torch.int64
        np.testing.assert_array_equal(out["image_sizes"].numpy(), ref["image_sizes"], err_msg=name)
        np.testing.assert_array_equal(out["num_img_tokens"].numpy(), ref["num_img_tokens"],
                                      err_msg=name)
        if "pixel_values" in ref:
            expected = ref["pixel_values"]
        else:  # multi-image case: the concatenation of the single-image cases
            assert all(case["pixel_values_equal_to_single_image_cases"])
            expected = np.concatenate([ip(_open(cases_dir, n))["pixel_values"].numpy() for n in names])
            assert list(expected.shape) == case["pixel_values_shape"]
        assert out["pixel_values"].shape == expected.shape, name
        err = float(np.abs(out["pixel_values"].numpy() - expected).max())
        report.append(f"{name}: max|d|={err:.2e}")
        assert err <= PIXEL_ATOL, f"{name}: pixel_values max |diff| {err:.3e} > {PIXEL_ATOL}"
        n_real = case.get("num_real_crops")
        if n_real is not None:  # padding crops are exact zeros, real ones are not
            assert not out["pixel_values"][0, n_real:].any(), name
            assert out["pixel_values"][0, n_real - 1].abs().sum() > 0, name
        if case.get("hd_image"):
            hd = ip.hd_image(_open(cases_dir, case["image"]))
            hd_ref = np.asarray(Image.open(cases_dir / case["hd_image"]).convert("RGB"))
            assert hd.shape == hd_ref.shape, name
            assert np.array_equal(hd, hd_ref), f"{name}: HD image differs in {(hd != hd_ref).sum()} values"
        if "image" in case:
            w, h = case["image_size_wh"]
            assert num_image_tokens(w, h, case["num_crops"]) == case["calc_num_image_tokens_from_image_size"]
            assert hd_size(w, h, case["num_crops"]) == tuple(case["hd_image_size_wh"])
    print("\n".join(report))


def test_token_count_table(cases_dir, processors):
    rows = json.loads((cases_dir / "token_count_table.json").read_text())["rows"]
    assert len(rows) == 236
    n_err = 0
    for r in rows:
        w, h, n = r["w"], r["h"], r["num_crops"]
        if r["HD_transform_error"]:
            n_err += 1
            with pytest.raises(ValueError, match=f"{w}x{h}.*num_crops={n}"):
                hd_size(w, h, n)
            with pytest.raises(ValueError, match=f"{w}x{h}.*num_crops={n}"):
                processors[n](Image.new("RGB", (w, h)))
            continue
        assert hd_size(w, h, n) == (r["hd_w"], r["hd_h"]) == (r["calc_w"], r["calc_h"]), r
        assert num_image_tokens(w, h, n) == r["num_img_tokens"] == r["num_img_tokens_from_size"], r
    assert n_err == 6


def test_token_count_table_real_resize(cases_dir, processors):
    """The HD image really produced (not just the arithmetic) has the table's size, for small inputs."""
    rows = json.loads((cases_dir / "token_count_table.json").read_text())["rows"]
    small = [r for r in rows if not r["HD_transform_error"] and r["hd_w"] * r["hd_h"] <= 1344 * 1344]
    assert len(small) > 100
    for r in small:
        hd = processors[r["num_crops"]].hd_image(Image.new("RGB", (r["w"], r["h"]), (10, 20, 30)))
        assert hd.shape == (r["hd_h"], r["hd_w"], 3), r


def test_spec_sizes():
    # PHI3V_SPEC §6 worked sizes and §11 token counts
    assert hd_size(640, 480, 4) == (672, 672) and num_image_tokens(640, 480, 4) == 757
    assert hd_size(640, 480, 16) == (1344, 1008) and num_image_tokens(640, 480, 16) == 1921
    assert hd_size(480, 640, 16) == (1008, 1344) and num_image_tokens(480, 640, 16) == 1933
    assert hd_size(1920, 1080, 16) == (1680, 1008) and num_image_tokens(1920, 1080, 16) == 2353
    assert hd_size(1080, 1920, 16) == (1008, 1680) and num_image_tokens(1080, 1920, 16) == 2377
    assert hd_size(4000, 400, 4) == (1344, 336) and num_image_tokens(4000, 400, 4) == 745
    assert tokens_for_hd_size(336, 1344) == 781 and tokens_for_hd_size(1344, 1344) == 2509


def test_normalised_white_and_layout(processors):
    # white padding -> (1.930336, 2.074884, 2.145897); crops row-major; global view first
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, 320:] = 255  # right half white
    out = processors[4](Image.fromarray(img))["pixel_values"][0]  # [5, 3, 336, 336]
    white = torch.tensor([1.930336, 2.074884, 2.145897])
    assert torch.allclose(out[1, :, 0, 0], white, atol=1e-5)          # top-left crop: padding row
    assert torch.allclose(out[2, :, 100, 200], white, atol=1e-5)      # top-right crop: white half
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[3, :, 100, 100], black, atol=1e-5)      # bottom-left: black half
    assert torch.allclose(out[0, :, 168, 50], black, atol=1e-5)       # global: left is black


def test_pixel_values_written_into_a_given_buffer(tiny_proc):
    """`out` / `pixel_values_out`: the crops go into (a slice of) a caller's buffer, bit-identical to
    the processor's own tensor; a buffer of the wrong shape or dtype is refused."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 90), (80, 40))]
    prompt = tiny_proc.apply_chat_template([{"role": "user", "content": "<|image_1|><|image_2|>\nx"}])
    ref = tiny_proc(prompt, images)
    c = tiny_proc.num_crops + 1
    buf = torch.full((3, c, 3, 336, 336), 7.0)
    enc = tiny_proc(prompt, images, pixel_values_out=buf[1:3])
    assert enc["pixel_values"].data_ptr() == buf[1].data_ptr()
    assert torch.equal(buf[1:3], ref["pixel_values"]) and bool((buf[0] == 7).all())
    assert torch.equal(enc["input_ids"], ref["input_ids"]) and torch.equal(enc["image_sizes"], ref["image_sizes"])
    for bad in (torch.empty(1, c, 3, 336, 336), torch.empty(2, c, 3, 336, 336, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must be a float32 tensor"):
            tiny_proc.image_processor(images, out=bad)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_cases(cases_dir, tiny_proc):
    data = json.loads((cases_dir / "tokenizer" / "tokenizer_cases.json").read_text())
    assert len(data["encode"]) == 10 and len(data["chat_template"]) == 2
    tok = tiny_proc.tokenizer
    for c in data["encode"]:
        enc = tok.encode(c["text"])
        assert enc.ids == c["input_ids"], c["text"]
        # token strings by id (Encoding.tokens keeps the newline an rstrip token swallowed)
        assert [tok.id_to_token(i) for i in enc.ids] == c["tokens"], c["text"]
        assert tiny_proc.encode(c["text"]) == c["input_ids_no_special"], c["text"]
        assert tiny_proc.encode(c["text"], add_special_tokens=True) == c["input_ids"], c["text"]
        assert tiny_proc.decode(c["input_ids"], skip_special_tokens=False) == c["decode"], c["text"]
        assert tiny_proc.decode(c["input_ids"]) == c["decode_skip_special"], c["text"]
        assert tiny_proc(c["text"])["input_ids"].tolist() == [c["input_ids"]]
    for c in data["chat_template"]:
        assert tiny_proc.apply_chat_template(c["messages"]) == c["with_generation_prompt"]
        assert tiny_proc.apply_chat_template(c["messages"], add_generation_prompt=False) == \
            c["without_generation_prompt"]


def test_chat_template_prompt_cases(cases, tiny_proc):
    for c in cases:
        if c["kind"] == "prompt_processor" and isinstance(c.get("messages"), list):
            assert tiny_proc.apply_chat_template(c["messages"]) == c["prompt"], c["name"]
    # a conversation ending with the assistant gets no generation prompt
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tiny_proc.apply_chat_template(msgs) == "<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n"


def test_special_token_ids(tiny_proc, real_proc):
    for p in (tiny_proc, real_proc):
        assert (p.bos_token_id, p.eos_token_id, p.pad_token_id, p.end_token_id) == (1, 32000, 32000, 32007)
        assert p.num_crops == 4


def test_decode_tensor_and_placeholders(tiny_proc):
    ids = tiny_proc("<|image_1|>\nHello world", images=[Image.new("RGB", (336, 336))])["input_ids"][0]
    assert (ids < 0).sum() == 757
    # image run dropped, both BOS skipped; the decoder strips the "▁" before the newline
    assert tiny_proc.decode(ids) == "\nHello world"
    assert tiny_proc.decode(ids, skip_special_tokens=False) == "<s><s> \nHello world"
    with pytest.raises(ValueError, match="one sequence"):
        tiny_proc.decode(ids[None])


# ----------------------------------------------------------------------------- prompts


def test_prompt_cases(cases, cases_dir, tiny_proc):
    seen = 0
    for c in _of_kind(cases, "prompt_processor"):
        if c["name"] in TEXT_BATCH_CASES:
            continue
        assert c["num_crops"] == tiny_proc.num_crops
        images = [_open(cases_dir, n) for n in c["images"]] or None
        out = tiny_proc(c["prompt"], images=images)
        ref = np.load(cases_dir / c["file"])
        for key in ("input_ids", "attention_mask", "image_sizes"):
            if key in ref:
                assert out[key].dtype == torch.int64
                np.testing.assert_array_equal(out[key].numpy(), ref[key], err_msg=f"{c['name']} {key}")
        if images:
            assert list(out["pixel_values"].shape) == c["pixel_values_shape"], c["name"]
        else:
            assert "pixel_values" not in out and "image_sizes" not in out
        seen += 1
    assert seen == 10


def test_model_case_inputs(cases, cases_dir, tiny_proc):
    """The single-prompt model/generate cases store pixel_values too: check them end to end."""
    seen = 0
    for c in cases:
        if c["kind"] not in ("model_forward", "generate") or not isinstance(c.get("prompt"), str):
            continue
        ref = np.load(cases_dir / c["file"])
        images = [_open(cases_dir, n) for n in c.get("images") or []] or None
        out = tiny_proc(c["prompt"], images=images)
        np.testing.assert_array_equal(out["input_ids"].numpy(), ref["input_ids"], err_msg=c["name"])
        np.testing.assert_array_equal(out["attention_mask"].numpy(), ref["attention_mask"])
        if images:
            np.testing.assert_array_equal(out["image_sizes"].numpy(), ref["image_sizes"])
            err = float(np.abs(out["pixel_values"].numpy() - ref["pixel_values"]).max())
            assert err <= PIXEL_ATOL, f"{c['name']}: pixel_values max |diff| {err:.3e}"
        seen += 1
    assert seen >= 7


def test_malformed_prompts(cases_dir, tiny_proc):
    bad = json.loads((cases_dir / "prompt" / "malformed.json").read_text())
    assert len(bad) == 7
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    for c in bad:
        assert c["raised"]
        with pytest.raises(ValueError) as e:
            tiny_proc(c["prompt"], images=[img] * c["n_images"])
        msg = str(e.value)
        if "total images" in c["message"]:  # count mismatch: both numbers named
            assert str(c["n_images"]) in msg and "image" in msg, msg
        elif "start from 1" in c["message"]:
            assert "<|image_1|>" in msg and "got ids" in msg, msg


def test_repeated_and_out_of_order_tags(tiny_proc):
    a, b = Image.new("RGB", (336, 336)), Image.new("RGB", (1000, 200))
    ids = tiny_proc("<|image_1|>x<|image_1|>", images=[a])["input_ids"][0].tolist()
    assert ids.count(-1) == 2 * 757 and ids[-1] == 1  # empty trailing chunk -> its own BOS
    ids = tiny_proc("<|image_2|> then <|image_1|>", images=[a, b])["input_ids"][0].tolist()
    assert ids[1:746] == [-2] * 745 and ids.count(-1) == 757


def test_real_tokenizer_cases(golden_dir, real_proc):
    data = json.loads((golden_dir / "phi3-tokenizer" / "cases.json").read_text())
    for c in data["text_cases"]:
        out = real_proc(c["text"])
        assert out["input_ids"].tolist() == [c["input_ids"]], c["text"]
        assert out["attention_mask"].tolist() == [[1] * len(c["input_ids"])]
        assert real_proc.decode(c["input_ids"]) == c["decoded_skip_special"], c["text"]
        assert real_proc.decode(c["input_ids"], skip_special_tokens=False) == c["decoded"], c["text"]
    cases_dir = golden_dir / "cases"
    for c in data["prompt_cases"]:
        proc = real_proc if c["num_crops"] == 4 else Processor.from_pretrained(
            golden_dir / "phi3-tokenizer", num_crops=c["num_crops"])
        images = [_open(cases_dir, n) for n in c["images"]] or None
        out = proc(c["prompt"], images=images)
        assert out["input_ids"][0].tolist() == c["input_ids"], c["name"]


# ----------------------------------------------------------------------------- loading / saving


def test_num_crops_override_and_save(golden_dir, tmp_path, tiny_proc):
    proc = Processor.from_pretrained(golden_dir / "tiny-phi3v", num_crops=16)
    assert proc.num_crops == 16 and proc.image_processor.num_crops == 16
    img = Image.new("RGB", (640, 480), (1, 2, 3))
    out = proc("<|image_1|>hi", images=[img])
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert (out["input_ids"] == -1).sum() == 1921
    proc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["num_crops"] == 16 and cfg["num_img_tokens"] == 144
    assert (tmp_path / "tokenizer.json").read_text() == \
        (golden_dir / "tiny-phi3v" / "tokenizer.json").read_text()
    again = Processor.from_pretrained(tmp_path)
    assert again.num_crops == 16
    assert again.tokenizer_config == tiny_proc.tokenizer_config
    assert torch.equal(again("<|image_1|>hi", images=[img])["input_ids"], out["input_ids"])


def test_pickles_for_dataloader_workers(tiny_proc):
    clone = pickle.loads(pickle.dumps(tiny_proc))
    img = Image.new("RGB", (300, 200), (5, 6, 7))
    a, b = tiny_proc("<|image_1|>\nhi", images=[img]), clone("<|image_1|>\nhi", images=[img])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_library_does_not_import_transformers():
    code = "import sys, phi3v.processor; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- bad input


def test_bad_num_crops(golden_dir):
    for n in (0, -1, 1.5, True, None, "4"):
        with pytest.raises(ValueError, match="num_crops"):
            ImageProcessor(num_crops=n)
    with pytest.raises(ValueError, match="num_crops"):
        Processor.from_pretrained(golden_dir / "tiny-phi3v", num_crops=0)
    with pytest.raises(ValueError, match="num_crops"):
        num_image_tokens(100, 100, 0)
    assert ImageProcessor(num_crops=np.int64(2)).num_crops == 2


def test_bad_image_sizes(processors):
    for w, h in ((0, 10), (10, 0), (0, 0)):
        with pytest.raises(ValueError, match="empty"):
            processors[4](Image.new("RGB", (w, h)))
        with pytest.raises(ValueError, match="empty"):
            num_image_tokens(w, h, 4)
    # 2000x1 at 4 crops: resized to 1344x0 (the reference crashes inside Pillow)
    with pytest.raises(ValueError, match="2000x1.*num_crops=4"):
        processors[4](Image.new("RGB", (2000, 1)))
    with pytest.raises(ValueError, match="1x2000.*num_crops=4"):
        processors[4](Image.new("L", (1, 2000)))
    # tiny but valid images are upscaled like the reference (1x1 -> 672x672 at 4 crops)
    out = processors[4](Image.new("RGB", (1, 1), (255, 255, 255)))
    assert out["image_sizes"].tolist() == [[672, 672]]


def test_corrupt_and_odd_images(tmp_path, processors, cases_dir):
    ip = processors[4]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ip([bad])
    with pytest.raises(ValueError, match="broken.png"):
        ip(str(bad))
    good = (cases_dir / "images" / "textured_640x480_s100.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        ip(truncated)
    with pytest.raises(ValueError, match="truncated.png"):  # lazily opened by the user
        ip(Image.open(truncated))
    with pytest.raises(ValueError, match="cannot read"):
        ip(good[:100])
    with pytest.raises(ValueError, match="missing.png"):
        ip(tmp_path / "missing.png")
    for thing in (np.zeros((10, 10, 3), np.uint8), 3, None):
        with pytest.raises(ValueError, match="expected a PIL image"):
            ip(thing)
    with pytest.raises(ValueError, match="no images"):
        ip([])
    # paths and bytes give the same result as the PIL image
    ref = ip(Image.open(cases_dir / "images" / "textured_640x480_s100.png"))["pixel_values"]
    assert torch.equal(ip(cases_dir / "images" / "textured_640x480_s100.png")["pixel_values"], ref)
    assert torch.equal(ip(good)["pixel_values"], ref)
    # other modes go through convert("RGB") (alpha dropped, palette expanded)
    for mode in ("P", "LA", "CMYK", "1", "I"):
        img = Image.new("RGB", (40, 30), (30, 120, 250)).convert(mode)
        expected = ip(img.convert("RGB"))["pixel_values"]
        assert torch.equal(ip(img)["pixel_values"], expected), mode
    png = io.BytesIO()
    Image.new("RGBA", (50, 40), (10, 20, 30, 0)).save(png, "PNG")
    out = ip(png.getvalue())["pixel_values"]  # transparent pixels keep their RGB, not white
    assert torch.equal(out, ip(Image.new("RGB", (50, 40), (10, 20, 30)))["pixel_values"])


def test_bad_prompts(tiny_proc):
    img = Image.new("RGB", (64, 64))
    for prompt in (["a", "b"], None, b"bytes", 3):
        with pytest.raises(ValueError, match="prompt must be one str"):
            tiny_proc(prompt)
        with pytest.raises(ValueError, match="prompt must be one str"):
            tiny_proc(prompt, images=[img])
    with pytest.raises(ValueError, match="2 distinct image tags but 1 images"):
        tiny_proc("<|image_1|><|image_2|>", images=[img])
    with pytest.raises(ValueError, match="got ids \\[0\\]"):
        tiny_proc("<|image_0|>", images=[img])
    # a bad image inside a prompt call is reported too
    with pytest.raises(ValueError, match="2000x1"):
        tiny_proc("<|image_1|>", images=[Image.new("RGB", (2000, 1))])
    for messages in ([], "hi", [{"role": "user"}], [{"role": "user", "content": ["x"]}]):
        with pytest.raises(ValueError, match="message"):
            tiny_proc.apply_chat_template(messages)
    with pytest.raises(ValueError, match="text must be a str"):
        tiny_proc.encode(None)


def test_from_pretrained_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a directory nor a hub id"):
        Processor.from_pretrained(tmp_path / "nope")


def test_hub_id_goes_through_snapshot_download(golden_dir, monkeypatch):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(golden_dir / "phi3-tokenizer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    proc = Processor.from_pretrained("microsoft/Phi-3.5-vision-instruct", num_crops=16)
    assert proc.num_crops == 16
    (repo_id, patterns), = calls
    assert repo_id == "microsoft/Phi-3.5-vision-instruct"
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(patterns)
    assert "model.safetensors" not in patterns
