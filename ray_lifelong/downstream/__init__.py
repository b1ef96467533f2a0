"""Downstream fine-tuning: a classification head on a pre-trained model, one run per task and seed."""
