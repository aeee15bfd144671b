"""Chroma-MoE training: data pipelines, phase-1 masked-LM pretraining and phase-2 contrastive tuning."""
