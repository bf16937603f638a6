"""Data path: tokenizer -> prepare (raw text -> Arrow token shards, framework/prepare.py) ->
shards (read, verify) -> mixture (which source each global sample comes from) -> packing
(documents cut into seq_len + 1 windows) -> loader (this rank's micro-batches, resumable state)."""
