"""Evaluation: MMEB, M-BEIR and held-out M3T retrieval."""
