"""Analytic training FLOPs of a step: the count behind MFU and the cost-matched studies.

Matmul FLOPs only (2 per multiply-add): the attention projections, the causal attention
matmuls and the SwiGLU projections of every layer, and the output head. Norms, RoPE,
softmax and other elementwise work are not counted, nor is remat recomputation (this is
model FLOPs, not hardware FLOPs). The backward pass counts twice the forward (input and
weight gradients), except for matmuls whose input is a constant (the q/k/v projections
reading the teacher's injected state at attention level), which need only the weight
gradient.
"""


from ..nn.config import TransformerConfig
from ..nn.costs import _head_flops, layer_flops
from .objective import DistillationObjective


def step_flops(
    objective: DistillationObjective,
    teacher: TransformerConfig,
    student: TransformerConfig,
    *,
    seq_len: int,
    batch: int,
    step: int = 0,
    cached: bool = False,
) -> float:
    """Training FLOPs of one distillation step of `objective` at `step` (the passes
    active then) on `batch` rows of `seq_len` tokens.

    - The teacher runs forward only: every layer and its head when the free pass runs
      (the KL reads its logits); without it, the layers a blockwise term reads (at
      attention level all but the last layer's MLP); not at all with `teacher_weight=0`,
      nor with `cached=True` (the KL reads the teacher's cached logits: see
      [`blockdistill.TeacherCache`][]; only for an objective without a blockwise term).
    - The free pass: the student's layers and head, forward and backward.
    - The blockwise term: each student block on the teacher's input, forward and
      backward (at attention level only the attention, whose q/k/v projections read a
      constant input: weight gradient only).

    **Example:**

    ```python
    objective = bd.DistillationObjective(blockwise_weight=1.0, inject_at="layer")
    flops = bd.step_flops(objective, cfg, cfg, seq_len=16, batch=8)
    ```
    """
    _, _, free_active, block_active = objective.passes(step)
    free, block = bool(free_active), bool(block_active)
    t, s = layer_flops(teacher, seq_len), layer_flops(student, seq_len)
    t_layer, s_layer = sum(t.values()), sum(s.values())
    teacher_fwd = student_fwd = student_bwd = 0.0
    if cached and objective.passes(0)[1]:
        raise ValueError("cached=True needs an objective without a blockwise term (the cache holds no states)")
    if free:
        if objective.uses_teacher and not cached:
            teacher_fwd = teacher.n_layers * t_layer + _head_flops(teacher, seq_len)
        forward = student.n_layers * s_layer + _head_flops(student, seq_len)
        student_fwd += forward
        student_bwd += 2.0 * forward
    if block:
        if not free:
            if objective.inject_at == "attention":
                teacher_fwd = (teacher.n_layers - 1) * t_layer + t["qkv"] + t["o"] + t["core"]
            else:
                teacher_fwd = teacher.n_layers * t_layer
        if objective.inject_at == "attention":
            student_fwd += student.n_layers * (s["qkv"] + s["o"] + s["core"])
            student_bwd += student.n_layers * (s["qkv"] + 2.0 * (s["o"] + s["core"]))
        else:
            student_fwd += student.n_layers * s_layer
            student_bwd += 2.0 * student.n_layers * s_layer
    return batch * (teacher_fwd + student_fwd + student_bwd)
