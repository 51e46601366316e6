"""Layer maps: which group of teacher layers each layer of a shallower student stands
for, checked against both depths."""

from collections.abc import Sequence


def default_layer_map(teacher_layers: int, student_layers: int) -> tuple[tuple[int, int], ...]:
    """Equal contiguous groups: student layer `j` stands for teacher layers `[j*g, (j+1)*g)`.

    Raises a `ValueError` naming both depths when the teacher's depth is not a multiple
    of the student's.

    **Example:**

    ```python
    bd.default_layer_map(6, 3)  # ((0, 2), (2, 4), (4, 6))
    ```
    """
    if student_layers <= 0 or student_layers > teacher_layers or teacher_layers % student_layers != 0:
        raise ValueError(
            f"cannot group a teacher of {teacher_layers} layers into a student of "
            f"{student_layers} layers: the teacher's depth must be a positive multiple of "
            "the student's (or pass an explicit layer_map)"
        )
    group = teacher_layers // student_layers
    return tuple((j * group, (j + 1) * group) for j in range(student_layers))


def _validate_layer_map(layer_map: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    spans = []
    previous_end = 0
    for j, span in enumerate(layer_map):
        if len(span) != 2:
            raise ValueError(f"layer_map[{j}]={tuple(span)!r} is invalid: must be a pair (start, end)")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end:
            raise ValueError(
                f"layer_map[{j}]=({start}, {end}) is invalid: need 0 <= start < end"
            )
        if start < previous_end:
            raise ValueError(
                f"layer_map[{j}]=({start}, {end}) is invalid: overlaps or precedes the "
                f"previous span, which ends at {previous_end}"
            )
        spans.append((start, end))
        previous_end = end
    if not spans:
        raise ValueError("layer_map=() is invalid: needs one span per student layer")
    return tuple(spans)


def resolve_layer_map(
    layer_map: Sequence[Sequence[int]] | None, inject_at: str, teacher_layers: int, student_layers: int
) -> tuple[tuple[int, int], ...]:
    """The spans of `layer_map` (or, when `None`, the identity for equal depths and
    [`blockdistill.default_layer_map`][] otherwise) for a teacher/student depth pair: the
    body of `DistillationObjective.resolve_layer_map`.

    Raises a `ValueError` that names both depths when they cannot be mapped.
    """
    if layer_map is not None:
        spans = _validate_layer_map(layer_map)
        if len(spans) != student_layers or spans[-1][1] > teacher_layers:
            raise ValueError(
                f"layer_map={spans} does not fit a teacher of {teacher_layers} layers and "
                f"a student of {student_layers} layers: it needs {student_layers} spans "
                f"ending at or before {teacher_layers}"
            )
        return spans
    if teacher_layers == student_layers:
        return tuple((j, j + 1) for j in range(student_layers))
    if inject_at != "layer":
        raise ValueError(
            f"a teacher of {teacher_layers} layers and a student of {student_layers} layers "
            "can only be mapped at inject_at='layer' (attention-level injection needs "
            "equal depths)"
        )
    return default_layer_map(teacher_layers, student_layers)
