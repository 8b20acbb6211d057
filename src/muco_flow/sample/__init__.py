"""The bundled sample: M3T-mini, written in the published formats of M3T, MMEB and M-BEIR."""
