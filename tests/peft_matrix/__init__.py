"""PEFT 0.21.2's custom-model test matrix as data (cases), its models (models) and a differential harness (harness)."""
