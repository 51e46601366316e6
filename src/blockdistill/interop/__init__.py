"""Models in and out: Hugging Face folders (config and safetensors) and blockdistill's own
model folders."""
