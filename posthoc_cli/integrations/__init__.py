"""Trainer integrations, one module per trainer, each imported only when used.

- :mod:`posthoc_cli.integrations.lightning`: ``PosthocEMA``, a Lightning callback (extra ``[lightning]``).
- :mod:`posthoc_cli.integrations.transformers`: ``PosthocEMACallback``, a Hugging Face
  ``TrainerCallback`` (extra ``[transformers]``).

Each is a thin adapter from the trainer's hooks to :class:`posthoc_cli.Recorder`;
what they share (resuming at a trainer's step, refusing sharded models) is in
:mod:`posthoc_cli.integrations._common`, which imports no trainer.
"""
