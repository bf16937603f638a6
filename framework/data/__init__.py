"""Tokenizers, Arrow token shards, the embedded sample corpus, mixing, packing and loading."""
