"""Hugging Face GPT-2 / Llama directories: names.py (the name maps, both directions), export.py
(our model -> an HF directory), load.py (an HF directory -> readers for model.init_from)."""
