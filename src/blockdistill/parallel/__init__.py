"""Sharding primitives below the network: meshes and the placement of parameters,
optimizer state and batches on them."""
