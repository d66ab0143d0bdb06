"""Choosing the EMA: evaluate candidates with the user's metric, resumably, in parallel (``posthoc-ema sweep``)."""
