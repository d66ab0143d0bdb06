"""Recording in the training loop: the Recorder, its snapshot writer, the model binding (selection, DTensors,
live tensors), frozen weights stored once, resume, and the ranks of torch.distributed."""
