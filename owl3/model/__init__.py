"""The native PyTorch mPLUG-Owl3 (240728): one module per component, read bottom-up.

siglip.py (vision tower) -> qwen2.py (decoder blocks) -> hyper.py (gated visual cross-attention)
-> owl3.py (the whole model) ; generation.py (decoding) ; weights.py (strict checkpoint loading).
"""
