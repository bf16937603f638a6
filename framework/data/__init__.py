"""Data path: tokenizer -> prepare (raw records -> Arrow token shards: framework/prepare.py, the
record formats in formats.py, the input readers in records.py) ->
shards (read, verify) -> mixture (which source each global sample comes from) -> packing
(documents cut into seq_len + 1 windows) -> loader (this rank's micro-batches, resumable state)."""
