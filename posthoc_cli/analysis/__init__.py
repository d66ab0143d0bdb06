"""Reports on a recording: the inspect report, the recording plan (how to record for a budget), plots."""
