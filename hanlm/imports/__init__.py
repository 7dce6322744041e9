"""Checkpoints of other ecosystems read as hanlm checkpoints (`hanlm.checkpoint.Checkpoint`): Hugging Face
model directories. `hanlm.loading` sends a path here when it is one of them."""
