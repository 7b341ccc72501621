"""Malformed input through every entry point: each case must fail with the expected error type and a
message naming what is wrong (file, field, flag or value), and the command-line entry points must
say it in one line `<program>: error: ...` with a non-zero exit (the traceback only with
PHI3V_DEBUG=1). Areas: train.py arguments, config.json, adapter_config.json and adapter tensors, the
safetensors index, the tokenizer and preprocessor files, jsonl data, the model API,
`python -m phi3v.generate` (hub ids offline included), `python -m phi3v.memory`, the converters and
`convert.check`, damaged checkpoints."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import ENV, REPO, command

sys.path.insert(0, str(REPO))
import train as train_py  # noqa: E402
from phi3v import Phi3V, Phi3VConfig, Processor, apply_lora, cli, load_adapter, save_adapter  # noqa: E402
from phi3v import generate as generate_cli  # noqa: E402
from phi3v.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint  # noqa: E402
from phi3v.data import JsonlDataset  # noqa: E402
from phi3v.hf import checkpoint_files  # noqa: E402
from phi3v.schema import iter_jsonl  # noqa: E402


def one_line(err: str, program: str) -> str:
    """The single non-empty stderr line, which must be `<program>: error: ...` without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), err
    return lines[0]


def corrupt_jpeg(path: Path) -> None:
    """Keep the JPEG headers (the size reads fine) but cut the scan data: decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\xff\xda") + 30])


# ================================================================ train.py arguments (resolve)

def _train_arg_cases(tmp: Path) -> dict:
    afile = tmp / "a_file"
    afile.write_text("x")
    return {   # argv -> what the one error line must contain
        "batch_size 0": (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
        "batch_size negative": (["--batch_size", "-8"], "--batch_size"),
        "micro_batch_size 0": (["--micro_batch_size", "0"], "--micro_batch_size"),
        "learning_rate negative": (["--learning_rate", "-1e-4"], "--learning_rate must be a finite number > 0"),
        "learning_rate 0": (["--learning_rate", "0"], "--learning_rate"),
        "learning_rate nan": (["--learning_rate", "nan"], "--learning_rate"),
        "epochs 0": (["--num_train_epochs", "0"], "--num_train_epochs"),
        "epochs negative": (["--num_train_epochs", "-1"], "--num_train_epochs"),
        "epochs inf": (["--num_train_epochs", "inf"], "--num_train_epochs"),
        "max_steps 0": (["--max_steps", "0"], "--max_steps"),
        "warmup negative": (["--warmup_steps", "-1"], "--warmup_steps"),
        "weight_decay negative": (["--weight_decay", "-0.1"], "--weight_decay"),
        "max_grad_norm negative": (["--max_grad_norm", "-1"], "--max_grad_norm"),
        "max_length 0": (["--max_length", "0"], "--max_length"),
        "num_crops 0": (["--num_crops", "0"], "--num_crops"),
        "num_crops 17": (["--num_crops", "17"], "--num_crops must be 1..16"),
        "lora_rank 0": (["--lora_rank", "0"], "--lora_rank"),
        "lora_alpha 0": (["--lora_alpha", "0"], "--lora_alpha"),
        "lora_alpha_ratio 0": (["--lora_alpha_ratio", "0"], "--lora_alpha_ratio"),
        "lora_dropout 1": (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
        "lora_dropout negative": (["--lora_dropout", "-0.1"], "--lora_dropout"),
        "save_steps negative": (["--save_steps", "-1"], "--save_steps"),
        "keep_checkpoints 0": (["--keep_checkpoints", "0"], "--keep_checkpoints"),
        "eval_batch_size 0": (["--eval_batch_size", "0"], "--eval_batch_size"),
        "max_eval_samples 0": (["--max_eval_samples", "0"], "--max_eval_samples"),
        "max_new_tokens 0": (["--max_new_tokens", "0"], "--max_new_tokens"),
        "logging_steps 0": (["--logging_steps", "0"], "--logging_steps"),
        "num_workers negative": (["--num_workers", "-1"], "--num_workers"),
        "seed negative": (["--seed", "-1"], "--seed"),
        "seed too large": (["--seed", str(2 ** 32)], "--seed"),
        "not a number": (["--learning_rate", "fast"], "--learning_rate"),
        "output_dir is a file": (["--output_dir", afile], f"--output_dir {afile} is a file"),
        "output_dir under a file": (["--output_dir", afile / "out"], f"{afile} is a file"),
        "data_dir is a file": (["--task", "docvqa", "--data_dir", afile], f"--data_dir {afile} is a file"),
        "train_file is a dir": (["--task", "jsonl", "--train_file", tmp], f"{tmp} is a directory"),
        "adapter missing": (["--adapter", tmp / "nope"], "--adapter"),
        "resume dir a file": (["--resume", afile], f"--resume {afile} is a file"),
        "model is a file": (["--task", "jsonl", "--train_file", afile, "--model", afile], "--model"),
    } | _ignored_flag_cases(tmp, afile)


def _ignored_flag_cases(tmp: Path, afile: Path) -> dict:
    """A flag that the mode, the task or --eval_only would ignore (or that another flag overrides) is
    refused, also when given at its default value, under the spelling the user typed (recipe aliases
    included). `afile` stands in for a jsonl, `tmp` for an adapter and a data folder."""
    jsonl = ["--task", "jsonl", "--train_file", afile]
    evals = ["--eval_only", "--adapter", tmp]
    return {
        "adapter with full": (["--full", "--adapter", tmp], "--adapter is never loaded with --full"),
        "adapter with full_train": (["--full_train", "--adapter", tmp], "merge the adapter into its base first"),
        "lora_rank with full": (["--full", "--lora_rank", "64"], "--lora_rank configures a LoRA adapter, and --full"),
        "lora_alpha with full": (["--full", "--lora_alpha", "16"], "--lora_alpha configures a LoRA adapter"),
        "lora_alpha_ratio with full": (["--full", "--lora_alpha_ratio", "2"], "--lora_alpha_ratio configures"),
        "lora_dropout 0 with full": (["--full", "--lora_dropout", "0"], "--lora_dropout configures a LoRA adapter"),
        "lora_rank with adapter": (["--adapter", tmp, "--lora_rank", "8"], "--lora_rank is decided by the adapter"),
        "lora_alpha with adapter": (["--use_lora", "--adapter", tmp, "--lora_alpha", "16"], "adapter_config.json"),
        "lora_dropout with adapter": (["--qlora", "--adapter", tmp, "--lora_dropout", "0.1"], "--lora_dropout is"),
        "alpha and alpha_ratio": (["--lora_alpha", "16", "--lora_alpha_ratio", "0.5"],
                                  "--lora_alpha_ratio is overridden by --lora_alpha"),
        "merge with full": (["--full", "--merge"], "--merge folds a LoRA adapter into its base, and --full"),
        "epochs with max_steps": (["--max_steps", "4", "--num_train_epochs", "1"],
                                  "--num_train_epochs is overridden by --max_steps"),
        "data_dir with jsonl": (jsonl + ["--data_dir", tmp], "--data_dir is not read: --train_file names every"),
        "data_dir with both files": (["--task", "docvqa", "--data_dir", tmp, "--train_file", afile, "--eval_file",
                                      afile], "--data_dir is not read: --train_file and --eval_file name every"),
        "train_file with demo": (["--task", "demo", "--train_file", afile], "--train_file is not read by --task demo"),
        "eval_file with demo": (["--eval_file", afile], "--eval_file is not read by --task demo"),
        "hub model with demo": (["--task", "demo", "--model", "microsoft/Phi-3.5-vision-instruct"],
                                "--task demo downloads nothing"),
        "packing, micro-batch 1": (["--packing", "--micro_batch_size", "1"], "with --micro_batch_size 1 each row"),
        "packing, recipe's micro-batch 1": (jsonl + ["--packing"], "--packing packs the samples of a micro-batch"),
        "no-drop_too_long without max_length": (["--no-drop_too_long"], "--no-drop_too_long decides what happens"),
        "drop_too_long without max_length": (["--drop_too_long"], "without --max_length none is too long"),
        "eval_batch_size, no eval split": (jsonl + ["--eval_batch_size", "4"],
                                           "--eval_batch_size configures the evaluation, and there is no eval split"),
        "max_new_tokens, no eval split": (jsonl + ["--max_new_tokens", "64"], "--max_new_tokens configures"),
        "max_eval_samples, no eval split": (jsonl + ["--max_eval_samples", "2"], "add --eval_file"),
        "eval_steps, no eval split": (jsonl + ["--eval_steps", "2"], "--eval_steps configures the evaluation"),
        "max_eval_samples under max_generate_samples": (["--max_eval_samples", "8", "--max_generate_samples", "4"],
                                                        "--max_eval_samples is overridden by --max_generate_samples"),
        "flash attention with fp16": (["--use_flash_attention", "--fp16"],
                                      "--use_flash_attention implies --bf16 (the recipe's flash attention runs in "
                                      "bf16 only), which contradicts --fp16"),
        "flash attention with fp32": (["--use_flash_attention", "--fp32"], "which contradicts --fp32"),
        "eval_only without eval_file": (["--task", "jsonl", "--eval_only"], "--task jsonl needs --eval_file"),
        "eval_only with train_file": (["--task", "jsonl", "--eval_only", "--eval_file", afile, "--train_file", afile],
                                      "--train_file applies to training, and --eval_only trains nothing"),
        **{f"eval_only with {argv[0]}": (evals + argv, f"{argv[0]} applies to training, and --eval_only trains nothing")
           for argv in (["--learning_rate", "1e-4"], ["--num_train_epochs", "1"], ["--max_steps", "4"],
                        ["--save_steps", "2"], ["--keep_checkpoints", "2"], ["--resume"], ["--warmup_steps", "50"],
                        ["--lr_schedule", "cosine"], ["--weight_decay", "0.01"], ["--wd", "0"],
                        ["--max_grad_norm", "1"], ["--lora_rank", "8"], ["--packing"], ["--freeze_vision"],
                        ["--freeze_vision_model"], ["--compile"], ["--no_compile"], ["--recompute", "full"],
                        ["--offload_optimizer", "on"], ["--offload_activations"], ["--batch_size", "64"],
                        ["--batch_size_per_gpu", "2"], ["--max_length", "4096"], ["--no-drop_too_long"],
                        ["--skip_bad_records"], ["--index_cache", "none"], ["--report_to", "none"], ["--merge"],
                        ["--seed", "42"], ["--logging_steps", "1"],
                        ["--max_generate_samples", "2"])},
    }


def test_train_arguments_one_line_each(tmp_path, capsys, monkeypatch):
    """resolve() checks every flag's range (in-process: the same code path as the CLI)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, (argv, expect) in _train_arg_cases(tmp_path).items():
        with pytest.raises(SystemExit) as e:
            train_py.parse_args([str(a) for a in argv])
        assert e.value.code == 2, name
        line = one_line(capsys.readouterr().err, "train.py")
        assert expect in line, f"{name}: {line}"


def test_train_arguments_that_matter_still_parse(tmp_path, monkeypatch):
    """The command lines of the tests (test_train, test_watch), the README, bench/ and the recipe's
    flags parse: only flags that would do nothing are refused. A flag given at its default value is
    the user's (not replaced by a demo default)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, adapter, out = tmp_path / "model", tmp_path / "adapter", tmp_path / "out"
    model.mkdir(), adapter.mkdir()
    for task in ("ucf101", "docvqa", "hateful_memes", "nlvr2"):
        (tmp_path / task).mkdir()
        for split in ("train", "val"):
            (tmp_path / task / f"{task}_{split}.jsonl").write_text("{}\n")
    data = lambda task: ["--task", task, "--data_dir", tmp_path / task]       # noqa: E731
    jsonl = ["--task", "jsonl", "--train_file", tmp_path / "nlvr2" / "nlvr2_train.jsonl",
             "--eval_file", tmp_path / "nlvr2" / "nlvr2_val.jsonl"]
    demo = ["--task", "demo", "--model", model, "--data_dir", tmp_path / "demo", "--output_dir", out, "--no_tqdm",
            "--max_eval_samples", 2, "--max_new_tokens", 4]
    train = demo + ["--batch_size", 4, "--micro_batch_size", 2, "--num_workers", 0, "--logging_steps", 1,
                    "--max_steps", 4]
    lines = [
        [], ["--task", "demo", "--eval_steps", 16, "--save_best", "accuracy"],
        train, train + ["--save_steps", 2, "--keep_checkpoints", 5, "--merge"], train + ["--lora_dropout", 0.1],
        train + ["--resume", "--lora_rank", 8], train + ["--full", "--freeze_vision", "--num_workers", 1],
        train + ["--packing", "--freeze_vision"], train + ["--offload_activations"], train + ["--qlora"],
        train + ["--bf16"], train + ["--fp16"], train + ["--eval_steps", 2, "--save_best", "val_loss"],
        train + ["--eval_steps", 1, "--save_best", "accuracy", "--early_stopping", 1],
        demo + ["--eval_only", "--adapter", adapter],
        demo + ["--eval_only", "--qlora", "--adapter", adapter, "--bf16", "--num_crops", 1, "--eval_batch_size", 2],
        data("ucf101"), data("docvqa") + ["--full", "--bf16", "--batch_size", 64],
        data("nlvr2") + ["--full", "--freeze_vision", "--bf16"],
        data("hateful_memes") + ["--qlora", "--bf16", "--micro_batch_size", 2], jsonl,
        data("docvqa") + ["--eval_steps", 200, "--max_eval_samples", 2000, "--max_generate_samples", 500,
                          "--save_best", "anls", "--early_stopping", 5, "--report_to", "none"],
        data("docvqa") + ["--eval_only", "--model", model, "--adapter", adapter],
        data("docvqa") + ["--train_file", tmp_path / "nlvr2" / "nlvr2_train.jsonl"],
        ["--task", "docvqa", "--train_file", jsonl[3], "--eval_file", jsonl[5]],
        data("docvqa") + ["--full", "--max_steps", 12, "--batch_size", 8, "--logging_steps", 1,
                          "--max_eval_samples", 1, "--max_new_tokens", 4, "--no_tqdm", "--recompute", "full",
                          "--no_compile"],                                                 # bench/synthetic_run.py
        data("docvqa") + ["--full_train", "--bf16", "--use_flash_attention", "--batch_size", 64,
                          "--learning_rate", 5e-6, "--num_train_epochs", 2],               # the recipe's
        data("docvqa") + ["--use_qlora", "--lora_rank", 32, "--lora_alpha_ratio", 0.5, "--batch_size_per_gpu", 2,
                          "--packing", "--max_length", 4096, "--no-drop_too_long", "--use_flash_attention", "--bf16"],
        jsonl + ["--adapter", adapter, "--freeze_vision_model", "--resume"],
        ["--task", "jsonl", "--train_file", jsonl[3], "--no_tf32", "--offload_optimizer", "off", "--compile"],
    ]
    for argv in lines:
        train_py.parse_args([str(a) for a in argv])
    c = train_py.parse_args(["--task", "demo", "--batch_size", "64", "--micro_batch_size", "1", "--lora_rank", "64"])
    assert (c.batch_size, c.micro_batch_size, c.lora_rank, c.warmup_steps) == (64, 1, 64, 4)
    assert train_py.parse_args(["--model", str(model)]).model == str(model)


def test_resolve_of_a_config_built_in_code(tmp_path, monkeypatch):
    """resolve() without the command line counts the fields that differ from their defaults as given."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("{}\n")

    def error(msg):
        raise SystemExit(msg)
    c = train_py.resolve(train_py.TrainConfig(task="jsonl", train_file=str(jsonl), micro_batch_size=2), error)
    assert (c.train_file, c.micro_batch_size, c.mode) == (str(jsonl), 2, "lora")
    with pytest.raises(SystemExit, match="--adapter is never loaded with --full"):
        train_py.resolve(train_py.TrainConfig(task="jsonl", train_file=str(jsonl), mode="full",
                                              adapter=str(tmp_path)), error)


@pytest.fixture(scope="module")
def bad_run_inputs(demo_dir, tmp_path_factory):
    """Damaged copies of the demo model and data for the train.py subprocess cases."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data = root / "data"
    shutil.copytree(demo_dir / "data", data)
    first = json.loads((data / "ucf101_train.jsonl").read_text().splitlines()[0])
    corrupt_jpeg(data / "images" / first["conversations"][0]["images"][3])
    (data / "latin1.jsonl").write_bytes((data / "ucf101_train.jsonl").read_bytes().replace(b"Classify", b"Cl\xe4ssify"))
    models = {}
    for name, file, content in [("garbage_config", "config.json", b"\x00\x01 not json"),
                                ("bad_tokenizer_config", "tokenizer_config.json", b'{"bos_token": 5}')]:
        models[name] = root / name
        shutil.copytree(demo_dir / "model", models[name])
        (models[name] / file).write_bytes(content)
    models["small_vocab"] = root / "small_vocab"      # weights with 32000 ids, the demo tokenizer has 32045
    Phi3V.from_config(Phi3VConfig.tiny(vocab_size=32000)).save_pretrained(models["small_vocab"])
    for f in (demo_dir / "model").glob("*.json"):
        if f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, models["small_vocab"] / f.name)
    model = Phi3V.from_pretrained(demo_dir / "model")
    apply_lora(model, rank=2, alpha=4)
    save_adapter(model, root / "adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    return root, data, models


def test_train_errors_inside_main_one_line(demo_dir, bad_run_inputs):
    """Errors raised after the arguments are accepted (data, model files, adapter, a DataLoader
    worker) reach the user as one line naming the file; PHI3V_DEBUG=1 shows the traceback."""
    root, data, models = bad_run_inputs
    base = ["--model", demo_dir / "model", "--no_tqdm", "--num_workers", 0, "--max_steps", 1, "--batch_size", 8,
            "--micro_batch_size", 2, "--task", "jsonl", "--train_file", data / "ucf101_train.jsonl"]
    cases = {   # name: (argv, env, what the line must contain)
        "corrupt image in a worker": (base + ["--num_workers", 1, "--output_dir", root / "o1"], {},
                                      [f"{data / 'ucf101_train.jsonl'}:1", "cannot decode", ".3.jpg"]),
        "non-UTF-8 train file": (base + ["--train_file", data / "latin1.jsonl", "--output_dir", root / "o2"], {},
                                 [f"{data / 'latin1.jsonl'}:1", "UTF-8"]),
        "garbage config.json": (base + ["--model", models["garbage_config"], "--output_dir", root / "o3"], {},
                                [str(models["garbage_config"] / "config.json"), "not valid JSON"]),
        "bad tokenizer_config": (base + ["--model", models["bad_tokenizer_config"], "--output_dir", root / "o4"], {},
                                 ["tokenizer_config.json", "'bos_token'"]),
        "adapter r 0": (base + ["--adapter", root / "adapter", "--output_dir", root / "o5"], {},
                        ["adapter_config.json", "field 'r'", "got 0"]),
        "tokenizer beyond the vocabulary": (base + ["--model", models["small_vocab"], "--output_dir", root / "o7"], {},
                                            ["token ids up to 32044", "vocab_size is 32000"]),
    }
    debug = ("PHI3V_DEBUG", base + ["--train_file", data / "latin1.jsonl", "--output_dir", root / "o6"])
    procs = {name: subprocess.Popen(command([str(a) for a in argv]), cwd=REPO, env={**ENV, **env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, env, _) in {**cases, debug[0]: (debug[1], {"PHI3V_DEBUG": "1"}, None)}.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1, f"{name}: exit {p.returncode}\n{err}"
        if name == "PHI3V_DEBUG":
            assert "Traceback" in err and "latin1.jsonl:1" in err
            continue
        line = one_line(err, "train.py")
        for part in cases[name][2]:
            assert part in line, f"{name}: {line}"


# ================================================================ config.json

CONFIG_CASES = {   # name: (edit of config.json (a dict update, or raw bytes), what the message names)
    "garbage": (b"{{{ not json", "not valid JSON"),
    "not UTF-8": (b'{"model_type": "phi3_v\xff"}', "not UTF-8"),
    "a list": (b"[1, 2]", "must be a JSON object"),
    "hidden_size string": ({"hidden_size": "64"}, "field 'hidden_size' must be an integer >= 1"),
    "hidden_size 0": ({"hidden_size": 0}, "field 'hidden_size'"),
    "heads 0": ({"num_attention_heads": 0}, "field 'num_attention_heads'"),
    "heads negative": ({"num_attention_heads": -4}, "field 'num_attention_heads'"),
    "heads not dividing": ({"num_attention_heads": 5}, "field 'hidden_size'"),
    "vocab 0": ({"vocab_size": 0}, "field 'vocab_size'"),
    "layers negative": ({"num_hidden_layers": -1}, "field 'num_hidden_layers'"),
    "intermediate float": ({"intermediate_size": 128.5}, "field 'intermediate_size'"),
    "orig positions 1": ({"original_max_position_embeddings": 1}, "field 'original_max_position_embeddings'"),
    "eps 0": ({"rms_norm_eps": 0}, "field 'rms_norm_eps'"),
    "theta string": ({"rope_theta": "1e4"}, "field 'rope_theta'"),
    "rope_scaling a list": ({"rope_scaling": [1, 2]}, "field 'rope_scaling' must be a JSON object"),
    "rope factor strings": ({"rope_scaling": {"type": "su", "short_factor": ["a"] * 8, "long_factor": [1.0] * 8}},
                            "field 'rope_scaling.short_factor'"),
    "rope factor missing": ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8}},
                            "field 'rope_scaling.long_factor' is missing"),
    "embd_layer string": ({"embd_layer": "image"}, "field 'embd_layer'"),
    "img_processor null": ({"img_processor": None}, "field 'img_processor'"),
    "layer_idx string": ({"img_processor": {"layer_idx": "x", "image_dim_out": 32}}, "field 'img_processor.layer_idx'"),
    "vision_config string": ({"vision_config": "clip"}, "field 'vision_config'"),
    "vision patch 0": ({"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 2, "patch_size": 0}},
                       "field 'vision_config.patch_size'"),
    "vision heads not dividing": ({"vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                     "num_hidden_layers": 2, "num_attention_heads": 3}},
                                  "field 'vision_config.hidden_size'"),
    "dropout string": ({"attention_dropout": "0.1"}, "field 'attention_dropout'"),
    "tie true as string": ({"tie_word_embeddings": "no"}, "field 'tie_word_embeddings'"),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_bad_config_json(name, demo_dir, tmp_path):
    edit, expect = CONFIG_CASES[name]
    d = tmp_path / "model"
    d.mkdir()
    base = json.loads((demo_dir / "model" / "config.json").read_text())
    (d / "config.json").write_bytes(edit if isinstance(edit, bytes) else json.dumps({**base, **edit}).encode())
    with pytest.raises(ValueError) as e:
        Phi3VConfig.from_json(d)
    assert str(d / "config.json") in str(e.value) and expect in str(e.value), str(e.value)


# ================================================================ safetensors index

INDEX_CASES = {
    "garbage": (b"not json", "not valid JSON"),
    "a list": (b"[]", "must be a JSON object"),
    "no weight_map": (b'{"metadata": {}}', "field 'weight_map' is missing"),
    "weight_map a list": (b'{"weight_map": ["model.safetensors"]}', "field 'weight_map' must be a JSON object"),
    "weight_map empty": (b'{"weight_map": {}}', "field 'weight_map' is empty"),
    "file name a number": (b'{"weight_map": {"lm_head.weight": 5}}', "field 'weight_map.lm_head.weight'"),
    "file outside": (b'{"weight_map": {"lm_head.weight": "../x.safetensors"}}', "'weight_map.lm_head.weight'"),
    "missing shard": (b'{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}',
                      "model-00001-of-00002.safetensors, which is missing"),
}


@pytest.mark.parametrize("name", INDEX_CASES)
def test_bad_safetensors_index(name, tmp_path):
    content, expect = INDEX_CASES[name]
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        checkpoint_files(tmp_path)
    assert e.type is (FileNotFoundError if name == "missing shard" else ValueError)
    assert "model.safetensors.index.json" in str(e.value) and expect in str(e.value), str(e.value)


# ================================================================ adapter_config.json

ADAPTER_CASES = {
    "garbage": (b"{oops", "not valid JSON"),
    "a list": (b"[]", "must be a JSON object"),
    "r missing": ({"r": None}, "field 'r'"),
    "r string": ({"r": "8"}, "field 'r' must be an integer >= 1"),
    "r 0": ({"r": 0}, "field 'r'"),
    "r negative": ({"r": -2}, "field 'r'"),
    "r float": ({"r": 2.5}, "field 'r'"),
    "alpha string": ({"lora_alpha": "16"}, "field 'lora_alpha'"),
    "alpha 0": ({"lora_alpha": 0}, "field 'lora_alpha' must be a number > 0"),
    "dropout 1.5": ({"lora_dropout": 1.5}, "field 'lora_dropout'"),
    "dropout negative": ({"lora_dropout": -0.1}, "field 'lora_dropout'"),
    "targets a number": ({"target_modules": 5}, "field 'target_modules'"),
    "targets list of numbers": ({"target_modules": [1, 2]}, "field 'target_modules'"),
    "targets empty": ({"target_modules": []}, "field 'target_modules'"),
    "targets bad regex": ({"target_modules": "(qkv"}, "not a valid regular expression"),
    "rslora string": ({"use_rslora": "yes"}, "field 'use_rslora'"),
    "base name a number": ({"base_model_name_or_path": 7}, "field 'base_model_name_or_path'"),
    "peft type": ({"peft_type": "IA3"}, "field 'peft_type'"),
}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    save_adapter(apply_lora(Phi3V.from_config(Phi3VConfig.tiny()), rank=2, alpha=4), d)
    return d


@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_bad_adapter_config(name, adapter_dir, tmp_path):
    edit, expect = ADAPTER_CASES[name]
    d = tmp_path / "adapter"
    shutil.copytree(adapter_dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if isinstance(edit, bytes):
        (d / "adapter_config.json").write_bytes(edit)
    else:
        cfg.update(edit)
        (d / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(ValueError) as e:
        load_adapter(Phi3V.from_config(Phi3VConfig.tiny()), d)
    assert str(d / "adapter_config.json") in str(e.value) and expect in str(e.value), str(e.value)


QKV0 = "base_model.model.model.layers.0.self_attn.qkv_proj"
ADAPTER_TENSOR_CASES = {   # edit of the adapter's tensors -> what the message names after the file
    "int lora_A": (lambda t: t.update({f"{QKV0}.lora_A.weight": t[f"{QKV0}.lora_A.weight"].to(torch.int32)}),
                   f"tensor '{QKV0}.lora_A.weight' has dtype int32, expected a floating-point LoRA weight"),
    "bool lora_B": (lambda t: t.update({f"{QKV0}.lora_B.weight": t[f"{QKV0}.lora_B.weight"] > 0}),
                    f"tensor '{QKV0}.lora_B.weight' has dtype bool"),
    "0-d lora_A": (lambda t: t.update({f"{QKV0}.lora_A.weight": torch.tensor(1.0)}),
                   f"tensor '{QKV0}.lora_A.weight' has shape [], expected a 2-D LoRA weight matrix"),
    "3-d lora_B": (lambda t: t.update({f"{QKV0}.lora_B.weight": t[f"{QKV0}.lora_B.weight"][None]}),
                   "expected a 2-D LoRA weight matrix"),
    "unknown module": (lambda t: t.update({"base_model.model.transformer.h.0.lora_A.weight": torch.zeros(2, 2)}),
                       "module 'transformer.h.0' is not part of this model"),
    "A twice": (lambda t: t.update({f"{QKV0}.lora_A.default.weight": t[f"{QKV0}.lora_A.weight"].clone()}),
                "are both lora_A of module 'model.layers.0.self_attn.qkv_proj'"),
}


@pytest.mark.parametrize("name", ADAPTER_TENSOR_CASES)
def test_bad_adapter_tensors(name, adapter_dir, tmp_path):
    """Adapter tensors of a wrong dtype or rank, for an unknown module, or given twice: a ValueError
    naming the weights file and the key (never a silent cast, an IndexError or a silent overwrite)."""
    from safetensors.torch import load_file, save_file
    edit, expect = ADAPTER_TENSOR_CASES[name]
    d = tmp_path / "adapter"
    shutil.copytree(adapter_dir, d)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    model = Phi3V.from_config(Phi3VConfig.tiny())
    with pytest.raises(ValueError) as e:
        load_adapter(model, d)
    assert str(e.value).startswith(f"{d / 'adapter_model.safetensors'}: ") and expect in str(e.value), str(e.value)
    assert not any("lora_" in k for k in model.state_dict())


def test_adapter_bin_that_is_not_a_state_dict(adapter_dir, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(adapter_dir, d)
    (d / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": [1, 2]}, d / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: entry 'base_model.model.x.lora_A.weight' is a list"):
        load_adapter(Phi3V.from_config(Phi3VConfig.tiny()), d)
    torch.save([torch.zeros(2)], d / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: expected a state dict .* got list"):
        load_adapter(Phi3V.from_config(Phi3VConfig.tiny()), d)


def test_missing_adapter_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(Phi3V.from_config(Phi3VConfig.tiny()), tmp_path / "nowhere")


# ================================================================ tokenizer and preprocessor files

TOKENIZER_CASES = {   # (file, content: bytes or a dict merged into the file, what the message names)
    "tokenizer.json garbage": ("tokenizer.json", b"garbage", "not a valid tokenizers file"),
    "tokenizer.json not UTF-8": ("tokenizer.json", b'{"a": "\xff"}', "not UTF-8"),
    "tokenizer.json empty object": ("tokenizer.json", b"{}", "not a valid tokenizers file"),
    "tokenizer_config a list": ("tokenizer_config.json", b"[]", "must be a JSON object"),
    "tokenizer_config garbage": ("tokenizer_config.json", b"{,}", "not valid JSON"),
    "bos_token a number": ("tokenizer_config.json", {"bos_token": 5}, "field 'bos_token'"),
    "eos_token unknown": ("tokenizer_config.json", {"eos_token": "<nope>"}, "field 'eos_token' = '<nope>'"),
    "pad_token object without content": ("tokenizer_config.json", {"pad_token": {"x": 1}}, "field 'pad_token'"),
    "add_bos_token string": ("tokenizer_config.json", {"add_bos_token": "yes"}, "field 'add_bos_token'"),
    "num_crops string": ("preprocessor_config.json", {"num_crops": "4"}, "field 'num_crops'"),
    "num_crops 0": ("preprocessor_config.json", {"num_crops": 0}, "field 'num_crops' must be an integer >= 1"),
    "image_std zero": ("preprocessor_config.json", {"image_std": [0, 0.5, 0.5]}, "field 'image_std'"),
    "image_mean two values": ("preprocessor_config.json", {"image_mean": [0.5, 0.5]}, "field 'image_mean'"),
    "image_mean strings": ("preprocessor_config.json", {"image_mean": ["a", "b", "c"]}, "field 'image_mean'"),
    "preprocessor not UTF-8": ("preprocessor_config.json", b"\xfe\xff", "not UTF-8"),
    "special_tokens_map a list": ("special_tokens_map.json", b"[1]", "must be a JSON object"),
}


@pytest.mark.parametrize("name", TOKENIZER_CASES)
def test_bad_tokenizer_files(name, demo_dir, tmp_path):
    file, edit, expect = TOKENIZER_CASES[name]
    d = tmp_path / "model"
    shutil.copytree(demo_dir / "model", d)
    path = d / file
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **edit}))
    with pytest.raises(ValueError) as e:
        Processor.from_pretrained(d)
    assert str(path) in str(e.value) and expect in str(e.value), str(e.value)


# ================================================================ jsonl data

def test_non_utf8_jsonl_names_file_and_line(demo_dir, tmp_path):
    proc = Processor.from_pretrained(demo_dir / "model")
    lines = (demo_dir / "data" / "ucf101_train.jsonl").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(lines[0] + lines[1].replace(b"Classify", b"Cl\xe4ssify") + lines[2])
    (tmp_path / "images").symlink_to(demo_dir / "data" / "images")
    with pytest.raises(ValueError, match=rf"{bad}:2: not UTF-8 text \(byte 0xe4"):
        JsonlDataset(bad, proc)
    ds = JsonlDataset(bad, proc, on_bad_record="skip")          # a per-line problem: skippable
    assert len(ds) == 2 and len(ds.skipped) == 1 and f"{bad}:2" in ds.skipped[0]
    with pytest.raises(ValueError, match=rf"{bad}:2: not UTF-8"):
        list(iter_jsonl(bad))                                   # the evaluation's reader
    # a U+2028 inside a string is part of its record, not a line break
    sep = tmp_path / "sep.jsonl"
    sep.write_bytes(lines[0].replace(b"Classify", "Clas\u2028sify".encode()) + lines[1])
    assert [n for n, _ in iter_jsonl(sep)] == [1, 2]


# ================================================================ the model API

@pytest.fixture(scope="module")
def tiny_model():
    return Phi3V.from_config(Phi3VConfig.tiny(vocab_size=100, pad_token_id=99)).eval()


ids = torch.tensor([[1, 5, 7, 9]])
MODEL_CASES = {   # name: (call(model), what the message names)
    "float input_ids": (lambda m: m(ids.float()), "input_ids must be an integer tensor [B, T]"),
    "1-D input_ids": (lambda m: m(ids[0]), "input_ids must be an integer tensor [B, T]"),
    "bool input_ids": (lambda m: m(ids.bool()), "input_ids"),
    "list input_ids": (lambda m: m([[1, 2]]), "input_ids"),
    "id >= vocab": (lambda m: m(torch.tensor([[1, 100]])), "token id 100"),
    "id far below placeholders": (lambda m: m(torch.tensor([[1, -2_000_000_000]])), "-2000000000"),
    "empty prompt forward": (lambda m: m(ids[:, :0]), "input_ids is empty"),
    "empty prompt generate": (lambda m: m.generate(ids[:, :0]), "input_ids is empty"),
    "id >= vocab in generate": (lambda m: m.generate(torch.tensor([[3, 150]])), "token id 150"),
    "hidden with a float": (lambda m: m.hidden(ids.double()), "input_ids"),
    "labels wrong length": (lambda m: m(ids, labels=ids[:, :3]), "labels must be an integer tensor shaped like"),
    "labels out of range": (lambda m: m(ids, labels=torch.tensor([[1, 2, 300, -100]])), "labels hold 300"),
    "labels negative": (lambda m: m(ids, labels=torch.tensor([[1, 2, -5, -100]])), "labels hold -5"),
    "labels float": (lambda m: m(ids, labels=ids.float()), "labels"),
    "mask wrong shape all ones": (lambda m: m(ids, attention_mask=torch.ones(1, 3)), "attention_mask must be"),
    "mask wrong batch": (lambda m: m(ids, attention_mask=torch.ones(2, 4)), "attention_mask must be"),
    "mask values": (lambda m: m(ids, attention_mask=torch.tensor([[1, 2, 1, 1]])), "only 0 (padding) and 1"),
    "generate mask wrong shape": (lambda m: m.generate(ids, attention_mask=torch.ones(1, 5)), "attention_mask"),
    "generate right padding": (lambda m: m.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 0]])),
                               "left-padded"),
    "generate empty row": (lambda m: m.generate(torch.tensor([[1, 2], [3, 4]]),
                                                attention_mask=torch.tensor([[1, 1], [0, 0]])), "without tokens"),
    "max_new_tokens 0": (lambda m: m.generate(ids, max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens float": (lambda m: m.generate(ids, max_new_tokens=2.5), "max_new_tokens"),
    "top_p 0": (lambda m: m.generate(ids, do_sample=True, top_p=0.0), "top_p must be in (0, 1]"),
    "top_p above 1": (lambda m: m.generate(ids, do_sample=True, top_p=1.5), "top_p"),
    "temperature 0": (lambda m: m.generate(ids, do_sample=True, temperature=0.0), "temperature"),
    "pixel_values without sizes": (lambda m: m(ids, pixel_values=torch.zeros(1, 2, 3, 336, 336)), "image_sizes"),
    "image placeholders without pixels": (lambda m: m(torch.tensor([[1, -1, -1, 5]])), "pixel_values"),
    "position_ids wrong shape": (lambda m: m(ids, position_ids=torch.arange(3)[None]), "position_ids"),
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_api_rejects(name, tiny_model):
    call, expect = MODEL_CASES[name]
    with pytest.raises(ValueError) as e:
        call(tiny_model)
    assert expect in str(e.value), str(e.value)


def test_model_api_still_accepts_good_input(tiny_model):
    out = tiny_model(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]), labels=torch.tensor([[-100, 5, 7, 9]]))
    assert out.logits.shape == (1, 4, 100) and torch.isfinite(out.loss)
    assert tiny_model(ids.int(), labels=ids.int()).loss is not None             # int32 works as in torch
    new = tiny_model.generate(torch.tensor([[99, 1, 5], [1, 5, 7]]),
                              attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), max_new_tokens=2)
    assert new.shape[0] == 2


# ================================================================ python -m phi3v.generate

def _generate_arg_cases(demo_dir, tmp):
    base = ["--model", str(demo_dir / "model"), "--prompt", "hi"]
    return {
        "device typo": (base + ["--device", "cudaa"], "--device 'cudaa'"),
        "device index out of range": (base + ["--device", "cuda:99"], "--device cuda:99"),
        "device kind": (base + ["--device", "meta"], "--device meta"),
        "top_p 0": (base + ["--top_p", "0"], "argument --top_p: must be in (0, 1], got 0"),
        "top_p above 1": (base + ["--top_p", "1.5"], "--top_p"),
        "top_p nan": (base + ["--top_p", "nan"], "--top_p"),
        "max_new_tokens 0": (base + ["--max_new_tokens", "0"], "argument --max_new_tokens: must be an integer >= 1"),
        "max_new_tokens negative": (base + ["--max_new_tokens", "-3"], "--max_new_tokens"),
        "temperature 0": (base + ["--temperature", "0"], "--temperature"),
        "num_crops 0": (base + ["--num_crops", "0"], "--num_crops"),
        "image missing": (base + ["--image", str(tmp / "no.png")], "no.png"),
        "adapter missing": (base + ["--adapter", str(tmp / "noad")], "noad"),
        "no prompt": (["--model", "x"], "--prompt"),
        "temperature without sampling": (base + ["--temperature", "0.7"], "--temperature: only used when sampling; "
                                         "add --do_sample"),
        "top_p without sampling": (base + ["--top_p", "0.9"], "--top_p: only used when sampling"),
        "both without sampling": (base + ["--top_p", "0.9", "--temperature", "2"],
                                  "--temperature and --top_p: only used when sampling"),
        "num_crops without image": (base + ["--num_crops", "4"], "--num_crops only applies to images"),
    }


def test_generate_arguments_one_line_each(demo_dir, tmp_path, capsys):
    for name, (argv, expect) in _generate_arg_cases(demo_dir, tmp_path).items():
        if name.startswith("device") and torch.cuda.device_count() > 99:
            continue
        with pytest.raises(SystemExit) as e:
            generate_cli.main(argv)
        assert e.value.code == 2, name
        line = one_line(capsys.readouterr().err, "phi3v.generate")
        assert expect in line, f"{name}: {line}"


def test_generate_cli_one_line_from_the_shell(bad_run_inputs, demo_dir):
    """The __main__ block: argument errors (exit 2) and library errors (exit 1) both as one line."""
    _, _, models = bad_run_inputs
    runs = {
        "bad top_p": (["--model", str(demo_dir / "model"), "--prompt", "x", "--top_p", "2"], 2, "--top_p"),
        "garbage config": (["--model", str(models["garbage_config"]), "--prompt", "x", "--device", "cpu"], 1,
                           "config.json"),
    }
    procs = {n: subprocess.Popen([sys.executable, "-m", "phi3v.generate", *argv], cwd=REPO, env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n, (argv, _, _) in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == runs[name][1], f"{name}: {err}"
        assert runs[name][2] in one_line(err, "phi3v.generate")


def test_generate_hub_id_offline_one_line(tmp_path):
    """An id that is not in the (empty) cache with HF_HUB_OFFLINE=1: one line naming the id and how
    to get it."""
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "phi3v.generate", "--model", "someone/not-cached", "--prompt", "x",
                        "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = one_line(r.stderr, "phi3v.generate")
    assert r.returncode == 1 and "'someone/not-cached' is not in the local Hugging Face cache" in line, line
    assert "hf download someone/not-cached" in line and "--model" in line, line


# ================================================================ python -m phi3v.memory

MEMORY_CASES = {   # argv -> what the one line names
    "lora_rank with full": (["--mode", "full", "--lora_rank", "8"], "--lora_rank applies to --mode lora/qlora"),
    "batch_size with offload on": (["--batch_size", "8", "--offload_optimizer", "on"],
                                   "--batch_size only decides --offload_optimizer auto"),
    "batch_size with full": (["--mode", "full", "--batch_size", "8"], "--mode full never uses"),
    "num_crops 0": (["--num_crops", "0"], "argument --num_crops: must be an integer >= 1"),
    "tokens negative": (["--tokens", "-5"], "argument --tokens"),
    "micro_batch_size 0": (["--micro_batch_size", "0"], "argument --micro_batch_size"),
    "world_size 0": (["--world_size", "0"], "argument --world_size"),
    "lora_rank 0": (["--lora_rank", "0"], "argument --lora_rank"),
    "gpu_memory 0": (["--gpu_memory", "0"], "argument --gpu_memory: must be a number > 0"),
    "gpu_memory nan": (["--gpu_memory", "nan"], "argument --gpu_memory"),
    "two precisions": (["--bf16", "--fp32"], "not allowed with argument"),
}


def test_memory_arguments_one_line_each(capsys):
    from phi3v import memory
    for name, (argv, expect) in MEMORY_CASES.items():
        with pytest.raises(SystemExit) as e:
            memory.main(argv)
        assert e.value.code == 2, name
        line = one_line(capsys.readouterr().err, "phi3v.memory")
        assert expect in line, f"{name}: {line}"


# ================================================================ converters and convert.check

def test_corrupt_tar_archive(tmp_path):
    from convert import ucf101
    from convert.common import ConvertError
    garbage = tmp_path / "UCF101_subset.tar.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    with pytest.raises(ConvertError, match=r"UCF101_subset\.tar\.gz: cannot extract the archive"):
        ucf101.convert(garbage, tmp_path / "o1")
    # a real archive cut in half
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(20):
            data = torch.randint(0, 255, (20000,), dtype=torch.uint8).numpy().tobytes()
            info = tarfile.TarInfo(f"UCF101_subset/train/A/v_{i}.avi")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut" / "UCF101_subset.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ConvertError, match="cannot extract the archive"):
        ucf101.convert(cut, tmp_path / "o2")
    r = subprocess.run([sys.executable, "-m", "convert.ucf101", "--src", str(cut), "--out_dir", str(tmp_path / "o3"),
                        "--no_progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    line = one_line(r.stderr, "convert.ucf101")
    assert r.returncode == 1 and line.startswith(f"convert.ucf101: error: {cut}: cannot extract the archive"), line


LLAVA_CASES = {   # item -> what the skip reason names
    "image a number": ({"id": "n", "image": 5, "conversations": []}, "'image'"),
    "image an object": ({"id": "o", "image": {"a": 1}, "conversations": []}, "'image'"),
    "image list of numbers": ({"id": "l", "image": [1, 2], "conversations": []}, "'image'"),
    "images a number": ({"id": "s", "images": 3, "conversations": []}, "'images'"),
    "conversations a string": ({"id": "c", "conversations": "hello"}, "'conversations'"),
    "conversations an object": ({"id": "d", "conversations": {"from": "human", "value": "x"}}, "'conversations'"),
    "conversations missing": ({"id": "m"}, "'conversations'"),
    "message a string": ({"id": "t", "conversations": ["hi", "there"]}, "'from' must be"),
    "message value a number": ({"id": "v", "conversations": [{"from": "human", "value": 3},
                                                             {"from": "gpt", "value": "x"}]}, "'value'"),
    "id an object": ({"id": {"x": 1}, "conversations": []}, "'id'"),
}


def test_llava_items_of_wrong_types_are_skipped(tmp_path):
    from convert import llava
    from convert.common import ConvertError
    good = {"id": "ok", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    items = [good] + [item for item, _ in LLAVA_CASES.values()]
    src = tmp_path / "mix.json"
    src.write_text(json.dumps(items))
    stats = llava.convert(src, tmp_path / "out")
    assert stats["records"] == {"mix.jsonl": 1} and stats["skipped"] == len(LLAVA_CASES)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    for s, (name, (_, expect)) in zip(skipped, LLAVA_CASES.items()):
        assert expect in s["reason"], f"{name}: {s}"
    assert [s["line"] for s in skipped] == [f"item {i}" for i in range(1, len(items))]
    with pytest.raises(ConvertError, match=r"mix\.json:item 1: 'image' must be"):
        llava.convert(src, tmp_path / "strict", strict=True)
    r = subprocess.run([sys.executable, "-m", "convert.llava", "--src", str(src), "--out_dir", str(tmp_path / "s2"),
                        "--strict", "--no_progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    line = one_line(r.stderr, "convert.llava")
    assert r.returncode == 1 and line.startswith("convert.llava: error: mix.json:item 1: 'image' must be"), line


def test_sharegpt_items_of_wrong_types_are_skipped(tmp_path):
    from convert import sharegpt
    items = [{"id": "s", "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
              "images": "a.png"},
             {"id": "m", "messages": 5},
             {"id": "c", "conversations": "hi"}]
    src = tmp_path / "chat.jsonl"
    src.write_bytes(b"".join(json.dumps(i).encode() + b"\n" for i in items) + b'{"id": "\xff"}\n')
    stats = sharegpt.convert(src, tmp_path / "out")
    assert stats["skipped"] == 4
    lines = (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()
    reasons = {s["line"]: s["reason"] for s in map(json.loads, lines)}
    assert "'images' must be a list" in reasons[1] and "'messages' must be a list" in reasons[2]
    assert "'conversations' must be a list" in reasons[3] and reasons[4].startswith("not UTF-8 text (byte 0xff")


def test_converter_inputs_not_utf8_and_bad_parquet(tmp_path):
    from convert import docvqa, hateful_memes
    from convert.common import ConvertError
    src = tmp_path / "docvqa"
    (src / "val").mkdir(parents=True)
    (src / "val" / "val_v1.0.json").write_bytes(b'{"data": [\n{"question": "\xe9t\xe9"}]}')
    with pytest.raises(ConvertError, match=r"val/val_v1\.0\.json:2: not UTF-8"):
        docvqa.convert(src, tmp_path / "o1")
    pq = tmp_path / "dq" / "train-00000-of-00001.parquet"
    pq.parent.mkdir()
    pq.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(ConvertError, match=r"train-00000-of-00001\.parquet: cannot read parquet file"):
        docvqa.convert(pq.parent, tmp_path / "o2")
    hm = tmp_path / "hm"
    (hm / "img").mkdir(parents=True)
    (hm / "train.jsonl").write_bytes(b'{"id": 1, "img": "img/1.png", "label": 0, "text": "caf\xe9"}\n')
    stats = hateful_memes.convert(hm, tmp_path / "o3")
    (s,) = [json.loads(line) for line in (tmp_path / "o3" / "skipped.jsonl").read_text().splitlines()]
    assert stats["skipped"] == 1 and s["line"] == 1 and s["reason"].startswith("not UTF-8")


def test_cauldron_rows_of_wrong_types_are_skipped(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from convert import nlvr2
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    f = tmp_path / "nlvr2" / "train-00000-of-00001.parquet"
    f.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([                 # texts are strings, not {user, assistant} objects
        {"images": [{"bytes": buf.getvalue(), "path": None}] * 2, "texts": ["true or false?"]}]), f)
    stats = nlvr2.convert(f.parent, tmp_path / "out", val_rows=0)
    (s,) = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert stats["skipped"] == 1 and s["line"] == "row 0" and "texts[0]" in s["reason"], s


def test_converter_cli_arguments(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    runs = {   # module, argv, what the line names
        "workers 0": ("convert.ucf101", ["--src", str(tmp_path), "--out_dir", str(tmp_path / "o"), "--workers", "0"],
                      "--workers"),
        "num_frames 0": ("convert.ucf101", ["--src", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                                            "--num_frames", "0"], "--num_frames"),
        "val_rows negative": ("convert.nlvr2", ["--src", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                                                "--val_rows", "-1"], "--val_rows"),
        "out_dir a file": ("convert.docvqa", ["--src", str(tmp_path), "--out_dir", str(afile)], str(afile)),
        "check max_problems": ("convert.check", [str(afile), "--max_problems", "-1"], "--max_problems"),
        "classes empty": ("convert.ucf101", ["--src", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                                             "--classes", ","], "argument --classes: expected comma-separated"),
        "classes twice": ("convert.ucf101", ["--src", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                                             "--classes", "A,B,A"], "each once"),
        "source empty": ("convert.llava", ["--src", str(afile), "--out_dir", str(tmp_path / "o"), "--source", " "],
                         "argument --source: expected a non-empty name"),
    }
    procs = {n: subprocess.Popen([sys.executable, "-m", mod, *argv], cwd=REPO, env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n, (mod, argv, _) in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, f"{name}: {err}"
        assert runs[name][2] in one_line(err, runs[name][0]), name


def test_converter_arguments_that_would_skip_every_record(tmp_path):
    """Library calls whose arguments would make every record a skip are refused up front."""
    from convert import llava, sharegpt, ucf101
    from convert.common import ConvertError
    src = tmp_path / "a.json"
    src.write_text("[]")
    with pytest.raises(ConvertError, match="image_folder .*nowhere: no such folder"):
        llava.convert(src, tmp_path / "o", image_folder=tmp_path / "nowhere")
    with pytest.raises(ConvertError, match="source must be a non-empty name"):
        sharegpt.convert(src, tmp_path / "o", source="")
    (tmp_path / "u" / "train" / "A").mkdir(parents=True)
    with pytest.raises(ConvertError, match=r"classes name \['A'\] more than once"):
        ucf101.convert(tmp_path / "u", tmp_path / "o", classes=["A", "A"])


def test_check_non_utf8_jsonl(demo_dir, tmp_path):
    from convert import check
    lines = (demo_dir / "data" / "ucf101_train.jsonl").read_bytes().splitlines(keepends=True)
    f = tmp_path / "x.jsonl"
    f.write_bytes(lines[0] + b"\xff\xfe garbage\n" + lines[1])
    s = check.check(f, demo_dir / "data" / "images")
    assert s["records"] == 2 and len(s["problems"]) == 1 and s["problems"][0].startswith(f"{f}:2: not UTF-8")
    r = subprocess.run([sys.executable, "-m", "convert.check", str(f), "--images_dir",
                        str(demo_dir / "data" / "images")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{f}:2: not UTF-8" in r.stdout and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "convert.check", str(tmp_path / "missing.jsonl")], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.jsonl" in one_line(r.stderr, "convert.check")


# ================================================================ damaged checkpoints

def test_damaged_checkpoint_file_is_found_by_its_checksum(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"w": torch.arange(1000.0)}, {"step": 3, "m": torch.ones(1000)},
                           {"note": "x"}, rank_state={"r": 1})
    listed = json.loads((path / "COMPLETE").read_text())
    assert set(listed["crc32"]) == set(listed["files"]) and verify_checkpoint(path) is None
    for name in ("optim_rank0.pt", "weights.safetensors", "meta.json", "rank0.pt"):
        f = path / name
        good = f.read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x55                        # same size, one byte changed
        f.write_bytes(bytes(bad))
        assert verify_checkpoint(path) == f"{f} is damaged (its CRC-32 differs from the one recorded at save)"
        with pytest.raises(ValueError, match=f"{name} is damaged"):
            load_checkpoint(path)
        f.write_bytes(good)
    assert load_checkpoint(path)[2]["note"] == "x"
    # a checkpoint written before checksums existed still loads (by size), a broken file named
    legacy = dict(listed)
    del legacy["crc32"]
    (path / "COMPLETE").write_text(json.dumps(legacy))
    assert verify_checkpoint(path) is None
    (path / "meta.json").write_bytes(b"x" * listed["files"]["meta.json"])
    with pytest.raises(ValueError, match="meta.json: cannot read checkpoint file"):
        load_checkpoint(path)


# ================================================================ the shared error line

def _fail_in_worker(i):
    raise ValueError(f"data.jsonl:{i + 1}: image 'x.jpg': cannot decode")


class _Bad(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        _fail_in_worker(i)


def test_worker_error_is_unwrapped_to_its_message():
    with pytest.raises(ValueError) as e:
        next(iter(torch.utils.data.DataLoader(_Bad(), num_workers=1)))
    assert "DataLoader worker" in str(e.value) and str(e.value).count("\n") > 3     # torch's wrapping
    assert cli.message(e.value) == "data.jsonl:1: image 'x.jpg': cannot decode"
    assert cli.message(RuntimeError("boom\nmore")) == "RuntimeError: boom more (set PHI3V_DEBUG=1 for the traceback)"
    assert cli.message(FileNotFoundError("no such file x")) == "no such file x"


def test_errors_context_one_line_or_traceback(capsys, monkeypatch):
    from tqdm import tqdm
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    bar = tqdm(total=3, desc="reading", file=sys.stderr)
    bar.update(1)
    with pytest.raises(SystemExit) as e:
        with cli.errors("prog", status=3):
            raise ValueError("data.jsonl:7: field 'id': missing")
    err = capsys.readouterr().err
    assert e.value.code == 3 and bar.disable            # the bar was closed before the line was written
    assert err.splitlines()[-1] == "prog: error: data.jsonl:7: field 'id': missing" and err.endswith("missing\n")
    monkeypatch.setenv("PHI3V_DEBUG", "1")
    with pytest.raises(ValueError, match="field 'id'"):    # the exception itself: python prints the traceback
        with cli.errors("prog"):
            raise ValueError("data.jsonl:7: field 'id': missing")


def test_demo_model_interrupted_midway_does_not_look_written(tmp_path, monkeypatch):
    """train.py writes the demo model when config.json is absent: a failure (or kill) while writing
    must not leave a config.json beside missing files."""
    from phi3v import demo

    def fail():
        raise OSError("No space left on device")
    monkeypatch.setattr(demo, "build_tokenizer", fail)
    with pytest.raises(OSError):
        demo.write_base_model(tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("kwargs, expect", [
    ({"rank": 0}, "rank must be a positive integer"), ({"rank": 2.5}, "rank"), ({"alpha": -1}, "alpha must be"),
    ({"alpha": float("nan")}, "alpha"), ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"targets": 5}, "targets must be"), ({"targets": ["qkv_proj", 3]}, "targets must be"),
])
def test_apply_lora_rejects(kwargs, expect):
    with pytest.raises(ValueError) as e:
        apply_lora(Phi3V.from_config(Phi3VConfig.tiny()), **{"rank": 2, "alpha": 4, **kwargs})
    assert expect in str(e.value), str(e.value)
