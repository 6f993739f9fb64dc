"""Training: data manifests, the toy world, one recipe per stage, checkpoints and evaluation."""
