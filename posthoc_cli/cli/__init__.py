"""The `posthoc-ema` command line (Typer): one module per command group."""
