"""Converters from raw dataset downloads and common VLM formats to the phi3v jsonl (CONTRACT.md).

Each `convert.<name>` module has `convert(src, out_dir, ...) -> stats` and a CLI
(`python -m convert.<name> --src RAW --out_dir OUT`); `convert.check` validates a jsonl file and its images;
The record format they write is `phi3v.schema` (the library's, shared with training and evaluation).
"""
