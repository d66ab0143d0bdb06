"""The files, read without torch: the safetensors container, atomic writes, snapshot and frozen-weight
records, sharded sets and the catalogue of a folder."""
