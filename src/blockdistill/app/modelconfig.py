"""Options of the commands that take a finished model: `blockdistill eval` and
`blockdistill generate`.

In a TOML file (`--config FILE`) the model is `[model] path` (with `tokenizer` and
`dtype`), the data options are `[data]`'s as for `distill`, the teacher of
`eval --teacher` is `[teacher] path`, `eval`'s sampling options live in `[eval]` and
`generate`'s in `[generate]`.
"""

import dataclasses

from ..nn.config import check_execution
from .options import ConfigError, _positive
from .runconfig import DataOptions, _library


@dataclasses.dataclass(frozen=True)
class EvalConfig(DataOptions):
    """Options of `blockdistill eval`."""

    model: str = "shipped"
    tokenizer: str | None = None
    eval_batches: int = 16
    dtype: str = "float32"
    teacher: str | None = None
    sample_rows: int = 8
    sample_tokens: int = 64
    sample_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "eval_batches", "sample_rows", "sample_tokens")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Options of `blockdistill generate` (continue prompts with a model, see
    [`blockdistill.generate`][])."""

    model: str = "shipped"
    prompt: tuple[str, ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    tokenizer: str | None = None
    dtype: str = "float32"

    #: what some options mean for this command (the others mean what they mean for `distill`)
    HELP_CHANGES = {"temperature": "sampling temperature; `0` is greedy decoding (the most likely token at every step)",
                    "top_k": "sample only from the K most likely tokens",
                    "seed": "the key of the sampling (the same seed gives the same text)"}
    #: where this command's sampling options live in a TOML file
    SECTION_CHANGES = {name: ("generate", name) for name in ("temperature", "top_k", "seed")}

    def __post_init__(self):
        if not self.prompt:
            raise ConfigError("prompt: give at least one text to continue (--prompt TEXT)")
        _positive(self, "max_new_tokens", "top_k", "top_p")
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature={self.temperature!r} is invalid: must be >= 0 (0 is greedy)")
        if self.top_p is not None and self.top_p > 1.0:
            raise ConfigError(f"top_p={self.top_p!r} is invalid: must be in (0, 1]")
        _library(check_execution, "none", self.dtype, "auto", "model")
