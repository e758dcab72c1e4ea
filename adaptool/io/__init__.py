"""Reading and writing checkpoints: safetensors files, PEFT adapter folders, the hub, atomic output."""
