"""Synthesis after training: the plan (weights per target), the tensor-by-tensor stream, outputs, frozen
copies, and one orchestrator for one process and for a torchrun team."""
