"""Hugging Face configs in and out: a Llama / Qwen2 / Mistral `config.json` as a
[`TransformerConfig`][blockdistill.TransformerConfig] (RoPE scaling included) and back,
a DeciLM / Nemotron-NAS one (per-layer shapes, see [`decilm`][blockdistill.interop.decilm])
as a heterogeneous config and back, and which architectures and keys are understood."""

from pathlib import Path
from typing import Any

from ..nn.config import RopeScaling, TransformerConfig
from . import decilm
from .decilm_code import AUTO_MAP

#: HF `model_type` -> the `*ForCausalLM` architecture that blockdistill reads and writes.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    decilm.MODEL_TYPE: decilm.ARCHITECTURE,
}
_MODEL_TYPES = {arch: model_type for model_type, arch in _ARCHITECTURES.items()}
_SUPPORTED = ", ".join(f"{t!r} ({a})" for t, a in _ARCHITECTURES.items())

#: TransformerConfig fields that `from_hf` may override: how the model runs, not its shapes.
_OVERRIDABLE = ("scan_layers", "remat", "dtype", "max_seq_len", "attention_impl")


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    """`(rope_theta, rope_scaling)` from either the legacy `rope_theta`/`rope_scaling`
    keys or the `rope_parameters` dict of newer `transformers`."""
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; "
            "supported: none ('default') and 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: llama3 rope_scaling lacks the field {missing}") from None
    return theta, scaling


def _config_from_hf(
    hf: dict[str, Any], source: Path, overrides: dict[str, Any]
) -> TransformerConfig:
    """A `TransformerConfig` from the contents of a HF `config.json`."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"{source}: model_type {model_type!r} (architectures {architectures}) is not "
            f"supported; supported model types: {_SUPPORTED}"
        )
    for architecture in architectures:
        if architecture not in _MODEL_TYPES:
            raise ValueError(
                f"{source}: architecture {architecture!r} is not supported (only the causal "
                f"LM heads are); supported: {_SUPPORTED}"
            )
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"{source}: hidden_act {activation!r} is not supported, only 'silu'")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window", "o_proj_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported by blockdistill")
    if hf.get("position_embedding_type", "rope") != "rope":
        raise ValueError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"from_hf cannot override {unknown}: the checkpoint fixes them; "
            f"overridable fields: {list(_OVERRIDABLE)}"
        )
    rope_theta, rope_scaling = _rope_from_hf(hf, source)
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    sliding_window = hf.get("sliding_window")
    if model_type == "mistral" and sliding_window:
        # Within the window sliding-window attention is plain causal attention.
        max_seq_len = min(max_seq_len, int(sliding_window))
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if model_type == decilm.MODEL_TYPE:  # per-layer shapes
        shapes = decilm.shape_fields(decilm.block_shapes_of(hf, source))
    else:
        shapes = dict(n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), mlp_dim=int(hf["intermediate_size"]))
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        **shapes,
        max_seq_len=max_seq_len,
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return TransformerConfig(**{**fields, **overrides})


def _config_to_hf(config: TransformerConfig, architecture: str, *, ffn_mult_only: bool = False) -> dict[str, Any]:
    """The HF `config.json` contents of a model with this config (`ffn_mult_only`: see
    [`block_configs_of`][blockdistill.interop.decilm.block_configs_of])."""
    model_type = _MODEL_TYPES[architecture]
    rope_scaling = None
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if model_type == decilm.MODEL_TYPE:  # the widths and KV heads are per layer
        del hf["intermediate_size"], hf["num_key_value_heads"]
        hf.update(
            block_configs=decilm.block_configs_of(config, ffn_mult_only=ffn_mult_only),
            attention_bias=False, mlp_bias=False, auto_map=dict(AUTO_MAP),
        )
    elif model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    else:
        hf.update(sliding_window=None)
    return hf
