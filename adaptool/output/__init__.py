"""What an output is made of besides tensors: the target folder's rules (``target``), the sinks (a model
folder, a PEFT adapter folder) and provenance."""
