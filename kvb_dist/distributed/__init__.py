"""The distributed layer: codebooks sharded over ranks (it knows nothing of classification)."""
