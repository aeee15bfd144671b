"""Chroma-MoE's domain tokenizer: a byte-level BPE trained on finance and retail text.

``tokenization.train`` builds and saves it as a ``PreTrainedTokenizerFast`` folder; ``tokenization.report`` measures
fertility and bytes per token against other tokenizers (e.g. all-MiniLM-L6-v2's WordPiece).
"""
