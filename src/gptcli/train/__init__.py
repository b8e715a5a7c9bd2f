"""`gptcli train`: raw text → tokens → a GPT trained by maximum likelihood → a Hugging Face folder.

data.py cleans and tokenizes the corpus into a memory-mapped token file; config.py resolves presets,
YAML files and overrides into frozen dataclasses; loop.py trains (single process or DDP) and
checkpoint.py writes atomic, resumable Hugging Face-format checkpoints.
"""
