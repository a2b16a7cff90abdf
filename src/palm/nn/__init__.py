"""Networks: the model registry, weights and checkpoints (safetensors), the weight average and the trained-model folder."""
