"""The method: feature losses and logit divergences, the sparse KL of cached top-k
logits, `DistillationObjective`, the jitted `DistillStep` and the fused step, students
pruned from the teacher, and the FLOPs of a step."""
