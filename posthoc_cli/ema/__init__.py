"""The math of post-hoc EMA, numpy only: power-function profiles, the least-squares fit, every target
kind (classical, library warm-ups, windows), their schedules, and how faithfully snapshots reproduce them."""
