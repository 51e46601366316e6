"""Teacher: a frozen wrapper around a Transformer."""

import equinox as eqx
import jax

from .._types import Segments, Tokens
from .config import TransformerConfig
from .model import ModelOutput, Transformer


class Teacher(eqx.Module):
    """A frozen teacher: `teacher(tokens)` is the wrapped model's output with
    `jax.lax.stop_gradient` applied to its parameters and to everything it returns.

    Pass it to a training step as a separate argument from the student: no gradient
    ever reaches it. `teacher(tokens, segment_ids=...)` runs a packed row of several
    documents (see [`blockdistill.Transformer`][]).

    **Arguments:**

    - `model`: the [`blockdistill.Transformer`][] to freeze.

    **Returns (call):** a [`blockdistill.ModelOutput`][] whose `states` are what a
    student consumes (`states.attn_in` or `states.layer_in` as `inject`) and imitates
    (`states.attn_out` or `states.layer_out`).

    **Example:**

    ```python
    teacher = bd.Teacher(model)
    teacher_out = jax.vmap(teacher)(batch_tokens)
    ```
    """

    model: Transformer

    @property
    def config(self) -> TransformerConfig:
        """The wrapped model's configuration."""
        return self.model.config

    def __call__(self, tokens: Tokens, *, segment_ids: Segments | None = None) -> ModelOutput:
        params, static = eqx.partition(self.model, eqx.is_array)
        model = eqx.combine(jax.lax.stop_gradient(params), static)
        return jax.lax.stop_gradient(model(tokens, segment_ids=segment_ids))
