"""Hugging Face interop: safetensors checkpoints in and out, and `tokenizers` tokenizers.

The parameters of a [`blockdistill.Transformer`][] use the Hugging Face `(out, in)` layout
and the "rotate half" RoPE convention, so a Llama / Qwen2 / Mistral checkpoint maps onto
it tensor by tensor: only the per-layer tensors `model.layers.{i}.*` are stacked on the
leading `layers` axis. Reading needs no torch: safetensors files are read with
`safetensors`' numpy API, and bfloat16 tensors (which numpy cannot represent) straight
from the file's bytes.
"""

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .._files import write_folder_atomically
from ..data.tokenizers import _TOKENIZER_FILES, tokenizer_files_of
from ..nn.config import TransformerConfig
from ..nn.hetero import describe_shapes
from ..nn.model import Transformer
from .hf_config import _MODEL_TYPES, _SUPPORTED, _config_from_hf, _config_to_hf

PathLike = str | os.PathLike

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
#: Tensors that some checkpoints carry but that hold nothing to load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

#: Per-layer HF tensor name (after `model.layers.{i}.`) -> the stacked leaf of the model.
_LAYER_WEIGHTS: dict[str, Callable[[Transformer], Any]] = {
    "input_layernorm.weight": lambda m: m.layers.layers.input_layernorm.weight,
    "self_attn.q_proj.weight": lambda m: m.layers.layers.self_attn.q_proj.weight,
    "self_attn.k_proj.weight": lambda m: m.layers.layers.self_attn.k_proj.weight,
    "self_attn.v_proj.weight": lambda m: m.layers.layers.self_attn.v_proj.weight,
    "self_attn.o_proj.weight": lambda m: m.layers.layers.self_attn.o_proj.weight,
    "post_attention_layernorm.weight": lambda m: m.layers.layers.post_attention_layernorm.weight,
    "mlp.gate_proj.weight": lambda m: m.layers.layers.mlp.gate_proj.weight,
    "mlp.up_proj.weight": lambda m: m.layers.layers.mlp.up_proj.weight,
    "mlp.down_proj.weight": lambda m: m.layers.layers.mlp.down_proj.weight,
}
_LAYER_BIASES: dict[str, Callable[[Transformer], Any]] = {
    "self_attn.q_proj.bias": lambda m: m.layers.layers.self_attn.q_proj.bias,
    "self_attn.k_proj.bias": lambda m: m.layers.layers.self_attn.k_proj.bias,
    "self_attn.v_proj.bias": lambda m: m.layers.layers.self_attn.v_proj.bias,
}
_GLOBAL_WEIGHTS: dict[str, Callable[[Transformer], Any]] = {
    "model.embed_tokens.weight": lambda m: m.embed_tokens.weight,
    "model.norm.weight": lambda m: m.norm.weight,
    "lm_head.weight": lambda m: m.lm_head.weight,
}


def _expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor of a checkpoint of this config."""
    q_width = config.n_heads * config.head_dim
    kv_width = config.n_kv_heads * config.head_dim
    per_layer = {
        "input_layernorm.weight": (config.dim,),
        "self_attn.q_proj.weight": (q_width, config.dim),
        "self_attn.k_proj.weight": (kv_width, config.dim),
        "self_attn.v_proj.weight": (kv_width, config.dim),
        "self_attn.o_proj.weight": (config.dim, q_width),
        "post_attention_layernorm.weight": (config.dim,),
        "mlp.gate_proj.weight": (config.mlp_dim, config.dim),
        "mlp.up_proj.weight": (config.mlp_dim, config.dim),
        "mlp.down_proj.weight": (config.dim, config.mlp_dim),
    }
    if config.qkv_bias:
        per_layer.update(
            {
                "self_attn.q_proj.bias": (q_width,),
                "self_attn.k_proj.bias": (kv_width,),
                "self_attn.v_proj.bias": (kv_width,),
            }
        )
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.dim),
        "model.norm.weight": (config.dim,),
    }
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.dim)
    for index in range(config.n_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{index}.{suffix}"] = shape
    return shapes


# ----------------------------------------------------------------------------- safetensors


def _read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries (`dtype`, `shape`, `data_offsets`) of a safetensors file, each
    with an added `start`: the absolute byte offset of its data in the file."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["start"] = 8 + header_len + entry["data_offsets"][0]
    return header


def _read_bfloat16(file: Path, entry: dict[str, Any]) -> np.ndarray:
    """A bfloat16 tensor as float32: bfloat16 is the upper half of a float32's bits."""
    count = int(np.prod(entry["shape"], dtype=np.int64))
    raw = np.fromfile(file, dtype="<u2", count=count, offset=entry["start"])
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one, or the shards of an index)."""
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} lists the shard {file.name}, which is missing")
        return files
    single = folder / _WEIGHTS_FILE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.safetensors")
    )
    hint = f" (found {others}; only {_WEIGHTS_FILE} or {_INDEX_FILE} are read)" if others else ""
    raise FileNotFoundError(f"{folder} has no {_WEIGHTS_FILE} nor {_INDEX_FILE}{hint}")


def _shape_error(name: str, expected: tuple[int, ...] | None, actual: Any) -> str:
    return f"tensor {name!r}: expected shape {expected}, got {actual}"


def _read_tensors(
    folder: Path, expected: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32, after checking names and shapes."""
    located: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in _weight_files(folder):
        for name, entry in _read_header(file).items():
            if not name.endswith(_IGNORED_SUFFIXES):
                located[name] = (file, entry)
    problems = []
    for name, shape in expected.items():
        if name not in located:
            problems.append(_shape_error(name, shape, "nothing (missing)"))
        elif tuple(located[name][1]["shape"]) != shape:
            problems.append(_shape_error(name, shape, tuple(located[name][1]["shape"])))
    extra = sorted(set(located) - set(expected))
    tied_head = "lm_head.weight" in extra and "lm_head.weight" not in expected
    if tied_head:  # a tied checkpoint may still store the head: it must equal the embedding
        extra.remove("lm_head.weight")
    for name in extra:
        problems.append(
            f"tensor {name!r}: unexpected (shape {tuple(located[name][1]['shape'])}), "
            "blockdistill has no parameter for it"
        )
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"checkpoint {folder} does not match its config:\n  {shown}{more}")
    wanted = list(expected) + (["lm_head.weight"] if tied_head else [])
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(located[name][0], []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="np") as handle:
            for name in names:
                entry = located[name][1]
                if entry["dtype"] == "BF16":
                    tensor = _read_bfloat16(file, entry)
                elif entry["dtype"] in ("F16", "F32", "F64"):
                    tensor = handle.get_tensor(name)
                else:
                    raise ValueError(
                        f"tensor {name!r} in {file} has dtype {entry['dtype']}; "
                        "expected BF16, F16, F32 or F64"
                    )
                tensors[name] = np.asarray(tensor, dtype=np.float32)
    if tied_head:
        head = tensors.pop("lm_head.weight")
        if not np.array_equal(head, tensors["model.embed_tokens.weight"]):
            raise ValueError(
                f"checkpoint {folder} sets tie_word_embeddings but stores an lm_head.weight "
                "that differs from model.embed_tokens.weight"
            )
    return tensors


# ----------------------------------------------------------------------------- import / export


def _parameter_slots(
    config: TransformerConfig,
) -> list[tuple[str, Callable[[Transformer], Any], bool]]:
    """`(hf_name, getter, per_layer)` for every parameter; per-layer names carry `{i}`."""
    slots = []
    for name, getter in _GLOBAL_WEIGHTS.items():
        if name != "lm_head.weight" or not config.tie_embeddings:
            slots.append((name, getter, False))
    layer_tensors = dict(_LAYER_WEIGHTS)
    if config.qkv_bias:
        layer_tensors.update(_LAYER_BIASES)
    for suffix, getter in layer_tensors.items():
        slots.append((f"model.layers.{{i}}.{suffix}", getter, True))
    return slots


def from_hf(path: PathLike, **config_overrides: Any) -> Transformer:
    """Load a Hugging Face Llama, Qwen2 or Mistral causal LM checkpoint.

    Reads `config.json` and `model.safetensors` (or the shards listed in
    `model.safetensors.index.json`) without torch; bfloat16, float16 and float32
    weights all become float32 parameters. Supported: `LlamaForCausalLM` (including
    Llama-3 `rope_scaling`), `Qwen2ForCausalLM` (q/k/v biases) and `MistralForCausalLM`
    (whose `max_seq_len` is capped at its `sliding_window`, within which its attention is
    plain causal attention), with tied or untied embeddings.

    **Arguments:**

    - `path`: the checkpoint folder (what `save_pretrained` writes).
    - `**config_overrides`: [`blockdistill.TransformerConfig`][] fields that say how the
      model runs rather than what it is: `scan_layers`, `remat`, `dtype` and `max_seq_len`
      (default: the checkpoint's `max_position_embeddings`).

    **Returns:** a [`blockdistill.Transformer`][] whose logits and per-layer states match
    the `transformers` model's.

    **Raises:** `FileNotFoundError` for a folder without `config.json` or weights;
    `ValueError` for an unsupported architecture or `rope_scaling`, and for a missing,
    unexpected or wrongly shaped tensor (naming it with the expected and actual shapes).

    **Example:**

    ```python
    teacher = bd.from_hf("checkpoints/SmolLM2-135M", scan_layers=True)
    out = teacher(jnp.asarray(tokens))
    ```
    """
    folder = Path(path)
    config_file = folder / _CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {_CONFIG_FILE}: not a Hugging Face checkpoint")
    config = _config_from_hf(json.loads(config_file.read_text()), config_file, config_overrides)
    tensors = _read_tensors(folder, _expected_shapes(config))
    skeleton = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    getters, values = [], []
    for name, getter, per_layer in _parameter_slots(config):
        getters.append(getter)
        if per_layer:
            stacked = np.stack([tensors[name.format(i=i)] for i in range(config.n_layers)])
            values.append(jnp.asarray(stacked))
        else:
            values.append(jnp.asarray(tensors[name]))
    model = eqx.tree_at(lambda m: [get(m) for get in getters], skeleton, values)
    unfilled = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    if unfilled:  # every parameter has an HF tensor; anything else is a bug here
        raise RuntimeError(f"from_hf left {len(unfilled)} parameters without a value")
    return model


def _special_token_ids(tokenizer_from: Path) -> dict[str, Any]:
    """`bos/eos/pad_token_id` from a checkpoint's `config.json`, if it has one."""
    ids: dict[str, Any] = {}
    for file_name in ("generation_config.json", _CONFIG_FILE):
        file = tokenizer_from / file_name
        if file.is_file():
            data = json.loads(file.read_text())
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if data.get(key) is not None:
                    ids[key] = data[key]
    return ids


def to_hf(
    model: Transformer,
    path: PathLike,
    *,
    architecture: str | None = None,
    tokenizer_from: PathLike | None = None,
) -> Path:
    """Write a model as a Hugging Face checkpoint (`config.json` + `model.safetensors`).

    The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives
    the same logits. Weights are written in float32 under the per-layer HF names. The
    folder is written next to `path` first and then renamed, so `path` never holds a
    half-written checkpoint; an existing folder at `path` is replaced.

    **Arguments:**

    - `model`: a [`blockdistill.Transformer`][].
    - `path`: the output folder.
    - `architecture`: `"LlamaForCausalLM"`, `"Qwen2ForCausalLM"` or
      `"MistralForCausalLM"`; default Qwen2 when the model has q/k/v biases, else Llama.
    - `tokenizer_from`: optional folder of a HF tokenizer (e.g. the teacher checkpoint)
      whose tokenizer files (`tokenizer.json`, `tokenizer_config.json`, ...) are copied
      along, together with the bos/eos/pad token ids of its `config.json`.

    **Returns:** `path` as a `pathlib.Path`.

    **Example:**

    ```python
    import transformers

    bd.to_hf(student, "out/student-hf", tokenizer_from="checkpoints/SmolLM2-135M")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained("out/student-hf")
    ```
    A heterogeneous student (`config.layer_shapes`, from [`blockdistill.assemble_student`][])
    has no `transformers` architecture: it is a `ValueError` that names its layers' shapes
    (save it with [`blockdistill.save_model`][]).
    """
    config = model.config
    if config.layer_shapes is not None:
        raise ValueError(
            f"this model's layers differ ({describe_shapes(config)}): transformers has no Llama, "
            "Qwen2 or Mistral with per-layer MLP widths, KV heads or missing parts; keep it in "
            "blockdistill's format (save_model / load_model)"
        )
    if architecture is None:
        architecture = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    if architecture not in _MODEL_TYPES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {_SUPPORTED}"
        )
    if config.qkv_bias and architecture != "Qwen2ForCausalLM":
        raise ValueError(
            f"the model has q/k/v biases (qkv_bias=True), which {architecture} cannot hold; "
            "use architecture='Qwen2ForCausalLM'"
        )
    tokenizer_files: list[Path] = []
    token_ids: dict[str, Any] = {}
    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        tokenizer_files = tokenizer_files_of(source)
        if not tokenizer_files:
            raise FileNotFoundError(
                f"tokenizer_from={str(source)!r} has none of the tokenizer files {_TOKENIZER_FILES}"
            )
        token_ids = _special_token_ids(source)

    tensors: dict[str, np.ndarray] = {}
    for name, getter, per_layer in _parameter_slots(config):
        value = np.asarray(getter(model), dtype=np.float32)
        if per_layer:
            for index in range(config.n_layers):
                tensors[name.format(i=index)] = np.ascontiguousarray(value[index])
        else:
            tensors[name] = np.ascontiguousarray(value)
    if architecture == "Qwen2ForCausalLM" and not config.qkv_bias:  # Qwen2 always has them
        widths = {"q": config.n_heads, "k": config.n_kv_heads, "v": config.n_kv_heads}
        for index in range(config.n_layers):
            for proj, heads in widths.items():
                name = f"model.layers.{index}.self_attn.{proj}_proj.bias"
                tensors[name] = np.zeros(heads * config.head_dim, dtype=np.float32)
    hf_config = {**_config_to_hf(config, architecture), **token_ids}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / _WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / _CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        for file in tokenizer_files:
            shutil.copyfile(file, folder / file.name)

    out = Path(path)
    write_folder_atomically(out, write)
    return out
