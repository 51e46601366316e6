"""Hugging Face interop: safetensors checkpoints in and out, and `tokenizers` tokenizers.

The parameters of a [`blockdistill.Transformer`][] use the Hugging Face `(out, in)` layout
and the "rotate half" RoPE convention, so a Llama / Qwen2 / Mistral checkpoint maps onto
it tensor by tensor: only the per-layer tensors `model.layers.{i}.*` are stacked on the
leading `layers` axis. A heterogeneous model goes in and out as NVIDIA Puzzle's DeciLM /
Nemotron-NAS format ([`decilm`][blockdistill.interop.decilm]): the same names, each layer's
tensors at its own shape. Reading needs no torch: safetensors files are read with
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
from ..nn.hetero import describe_shapes, own_weights, place_stack, stack_weights
from ..nn.model import Transformer
from . import decilm
from .decilm_code import CONFIGURATION_CODE, CONFIGURATION_FILE, MODELING_CODE, MODELING_FILE
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
    """HF tensor name -> shape, for every tensor of a checkpoint of this config (each
    layer's own tensors at its own shape, for a heterogeneous config)."""
    if config.layer_shapes is not None:
        shapes = {k: v for k, v in _expected_shapes(config.replace(layer_shapes=None)).items()
                  if not k.startswith("model.layers.")}
        stack = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0)).layers
        for index in range(config.n_layers):
            own = jax.eval_shape(lambda layers, i=index: stack_weights(layers, i), stack)
            shapes.update({f"model.layers.{index}.{name}": tuple(x.shape) for name, x in own.items()})
        return shapes
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
    folder: Path, expected: dict[str, tuple[int, ...]], aliases: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32, after checking names and shapes;
    `aliases` maps an expected name to the name the checkpoint stores it under."""
    located: dict[str, tuple[Path, dict[str, Any]]] = {}
    stored: dict[str, str] = {}  # expected name -> the checkpoint's, where they differ
    for file in _weight_files(folder):
        for name, entry in _read_header(file).items():
            if not name.endswith(_IGNORED_SUFFIXES):
                located[name] = (file, entry)
    for ours, theirs in (aliases or {}).items():
        if theirs in located and ours not in located:
            located[ours] = located.pop(theirs)
            stored[ours] = theirs
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
                    tensor = handle.get_tensor(stored.get(name, name))
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
    """Load a Hugging Face Llama, Qwen2, Mistral or DeciLM causal LM checkpoint.

    Reads `config.json` and `model.safetensors` (or the shards listed in
    `model.safetensors.index.json`) without torch; bfloat16, float16 and float32
    weights all become float32 parameters. Supported: `LlamaForCausalLM` (including
    Llama-3 `rope_scaling`), `Qwen2ForCausalLM` (q/k/v biases), `MistralForCausalLM`
    (whose `max_seq_len` is capped at its `sliding_window`, within which its attention is
    plain causal attention) and NVIDIA Puzzle's `DeciLMForCausalLM` (`model_type
    "nemotron-nas"`: per-layer KV heads and MLP widths, attention or MLP `no_op`; read as
    a heterogeneous model with `layer_shapes`, or a uniform one when every layer has the
    same full shape), with tied or untied embeddings.

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
    hf_config = json.loads(config_file.read_text())
    config = _config_from_hf(hf_config, config_file, config_overrides)
    aliases = decilm.linear_ffn_aliases(hf_config) if config.layer_shapes is not None else None
    tensors = _read_tensors(folder, _expected_shapes(config), aliases)
    skeleton = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    if config.layer_shapes is not None:  # each layer's own tensors into its segment's stack
        skeleton = eqx.tree_at(lambda m: m.layers, skeleton, _placed_layers(skeleton, tensors))
    getters, values = [], []
    for name, getter, per_layer in _parameter_slots(config):
        if per_layer and config.layer_shapes is not None:
            continue
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


def _placed_layers(skeleton: Transformer, tensors: dict[str, np.ndarray]) -> Any:
    """The layer stack of a heterogeneous model (an abstract `skeleton`) holding the
    checkpoint's per-layer tensors, each layer at its own shape in its segment."""
    rows = []
    for index in range(skeleton.config.n_layers):
        prefix = f"model.layers.{index}."
        rows.append({k[len(prefix):]: jnp.asarray(v) for k, v in tensors.items() if k.startswith(prefix)})
    return place_stack(skeleton.layers, rows)


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
    ffn_mult_only: bool = False,
) -> Path:
    """Write a model as a Hugging Face checkpoint (`config.json` + `model.safetensors`).

    The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives
    the same logits. Weights are written in float32 under the per-layer HF names. The
    folder is written next to `path` first and then renamed, so `path` never holds a
    half-written checkpoint; an existing folder at `path` is replaced.

    **Arguments:**

    - `model`: a [`blockdistill.Transformer`][].
    - `path`: the output folder.
    - `architecture`: `"LlamaForCausalLM"`, `"Qwen2ForCausalLM"`,
      `"MistralForCausalLM"` or `"DeciLMForCausalLM"`; default DeciLM for a heterogeneous
      model, else Qwen2 when the model has q/k/v biases, else Llama.
    - `tokenizer_from`: optional folder of a HF tokenizer (e.g. the teacher checkpoint)
      whose tokenizer files (`tokenizer.json`, `tokenizer_config.json`, ...) are copied
      along, together with the bos/eos/pad token ids of its `config.json`.
    - `ffn_mult_only`: DeciLM only: write every MLP width as `ffn_mult` (which every
      DeciLM loader reads) and refuse a width that is not a multiple of 256, instead of
      writing such a width as the exact `intermediate_size`.

    **Returns:** `path` as a `pathlib.Path`.

    **Example:**

    ```python
    import transformers

    bd.to_hf(student, "out/student-hf", tokenizer_from="checkpoints/SmolLM2-135M")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained("out/student-hf")
    ```
    A heterogeneous student (`config.layer_shapes`, from [`blockdistill.assemble_student`][])
    is written in NVIDIA Puzzle's DeciLM / Nemotron-NAS format (see
    [`blockdistill.to_decilm`][]), with the modeling code that `transformers` loads with
    `trust_remote_code=True` (a linear layer is a `replace_with_linear` attention, which
    vLLM's loader does not implement).
    """
    config = model.config
    if architecture is None:
        if config.layer_shapes is not None:
            architecture = decilm.ARCHITECTURE
        else:
            architecture = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    if architecture not in _MODEL_TYPES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {_SUPPORTED}"
        )
    if config.layer_shapes is not None and architecture != decilm.ARCHITECTURE:
        raise ValueError(
            f"this model's layers differ ({describe_shapes(config)}): {architecture} gives every layer "
            f"the same shape; write it as {decilm.ARCHITECTURE} (architecture=None)"
        )
    if config.qkv_bias and architecture not in ("Qwen2ForCausalLM", decilm.ARCHITECTURE):
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

    is_decilm = architecture == decilm.ARCHITECTURE
    hf_config = {**_config_to_hf(config, architecture, ffn_mult_only=ffn_mult_only), **token_ids}
    tensors: dict[str, np.ndarray] = {}
    for name, getter, per_layer in _parameter_slots(config):
        if per_layer and is_decilm:  # each layer's own tensors, at its own shape
            continue
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
    if is_decilm:
        for index in range(config.n_layers):
            for name, value in own_weights(model, index).items():
                tensors[f"model.layers.{index}.{name}"] = np.ascontiguousarray(np.asarray(value, np.float32))

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / _WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / _CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        if is_decilm:  # the modeling code of transformers' trust_remote_code=True
            (folder / CONFIGURATION_FILE).write_text(CONFIGURATION_CODE)
            (folder / MODELING_FILE).write_text(MODELING_CODE)
        for file in tokenizer_files:
            shutil.copyfile(file, folder / file.name)

    out = Path(path)
    write_folder_atomically(out, write)
    return out


def to_decilm(
    model: Transformer,
    path: PathLike,
    *,
    tokenizer_from: PathLike | None = None,
    ffn_mult_only: bool = False,
) -> Path:
    """Write a model, heterogeneous or uniform, in NVIDIA Puzzle's DeciLM / Nemotron-NAS
    format: [`blockdistill.to_hf`][] with `architecture="DeciLMForCausalLM"`.

    The folder holds `config.json` (`architectures: ["DeciLMForCausalLM"]`, `model_type:
    "nemotron-nas"`, one `block_configs` entry per layer: its `n_heads_in_group` or
    attention `no_op`, its MLP width as `ffn_mult` or `intermediate_size`, or MLP `no_op`),
    `model.safetensors` (each layer's own tensors under the Llama names, so the stored
    parameters are [`blockdistill.parameter_count`][] of the config), and blockdistill's
    own modeling code for `transformers.AutoModelForCausalLM.from_pretrained(path,
    trust_remote_code=True)` (`auto_map`). [`blockdistill.from_hf`][] reads it back.

    **Arguments:**

    - `model`: a [`blockdistill.Transformer`][]; a linear layer is written as a
      `replace_with_linear` attention with an FFN `no_op` (see the
      [Hugging Face guide](../hf.md#heterogeneous-students-the-decilm-nemotron-nas-format)).
    - `path`: the output folder (replaced atomically).
    - `tokenizer_from`: as for [`blockdistill.to_hf`][].
    - `ffn_mult_only`: write every MLP width as `ffn_mult` and refuse one that is not a
      multiple of 256 (the loaders' rounding), instead of writing it as the exact
      `intermediate_size`.

    **Returns:** `path` as a `pathlib.Path`.

    **Example:**

    ```python
    shapes = (bd.BlockShape(128, 2), bd.BlockShape(64, 1), bd.BlockShape(128, 0), bd.BlockShape(0, 2))
    student = bd.Transformer(cfg.replace(n_layers=4, layer_shapes=shapes), key=jax.random.key(0))
    folder = bd.to_decilm(student, "out/student-decilm")
    again = bd.from_hf(folder)
    assert again.config.layer_shapes == shapes
    ```
    """
    return to_hf(
        model, path, architecture=decilm.ARCHITECTURE, tokenizer_from=tokenizer_from, ffn_mult_only=ffn_mult_only
    )
