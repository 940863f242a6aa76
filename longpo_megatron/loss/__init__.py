"""LongPO loss: pure objective math, chunked vocab-parallel log-probs, and the rank-aware layer."""
