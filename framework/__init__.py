"""GPT pretraining framework: Hydra configs, DDP/ZeRO/FSDP2/TP, Arrow token shards."""

__version__ = "0.1.0"
