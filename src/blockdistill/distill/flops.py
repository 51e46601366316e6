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
from ..nn.costs import _head_flops, _layer_parts
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

    Every layer counts at its own shape (a heterogeneous model's layers at theirs).

    **Example:**

    ```python
    objective = bd.DistillationObjective(blockwise_weight=1.0, inject_at="layer")
    flops = bd.step_flops(objective, cfg, cfg, seq_len=16, batch=8)
    ```
    """
    _, _, free_active, block_active = objective.passes(step)
    free, block = bool(free_active), bool(block_active)
    t, s = _layer_parts(teacher, seq_len), _layer_parts(student, seq_len)
    attention = lambda p: p["qkv"] + p["o"] + p["core"]  # noqa: E731
    t_all, s_all = sum(sum(p.values()) for p in t), sum(sum(p.values()) for p in s)
    teacher_fwd = student_fwd = student_bwd = 0.0
    if cached and objective.passes(0)[1]:
        raise ValueError("cached=True needs an objective without a blockwise term (the cache holds no states)")
    if free:
        if objective.uses_teacher and not cached:
            teacher_fwd = t_all + _head_flops(teacher, seq_len)
        forward = s_all + _head_flops(student, seq_len)
        student_fwd += forward
        student_bwd += 2.0 * forward
    if block:
        if not free:
            if objective.inject_at == "attention":  # every layer but the last one's MLP
                teacher_fwd = t_all - sum(t[-1].values()) + attention(t[-1])
            else:
                teacher_fwd = t_all
        if objective.inject_at == "attention":
            student_fwd += sum(attention(p) for p in s)
            student_bwd += sum(p["qkv"] + 2.0 * (p["o"] + p["core"]) for p in s)
        else:
            student_fwd += s_all
            student_bwd += 2.0 * s_all
    return batch * (teacher_fwd + student_fwd + student_bwd)
