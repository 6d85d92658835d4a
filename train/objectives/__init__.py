"""Pretraining objectives: data-side masking transforms and losses on target positions."""
