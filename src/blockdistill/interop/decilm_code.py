"""The `transformers` code that [`blockdistill.to_hf`][] writes next to a DeciLM /
Nemotron-NAS checkpoint, so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` loads it: a config class and a torch causal LM covering the block
kinds blockdistill exports (grouped-query attention with the layer's own KV heads, or
none; a SwiGLU MLP of the layer's own width, or none; a layer with neither is the
identity). blockdistill's own code, kept as text here and written into each exported
folder (see [`decilm`][blockdistill.interop.decilm] for the format)."""

#: file name -> contents, written into an exported folder
CONFIGURATION_FILE = "configuration_blockdistill_decilm.py"
MODELING_FILE = "modeling_blockdistill_decilm.py"
#: `auto_map` of the exported `config.json`
AUTO_MAP = {
    "AutoConfig": "configuration_blockdistill_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_blockdistill_decilm.DeciLMForCausalLM",
}

CONFIGURATION_CODE = '''\
"""DeciLM / Nemotron-NAS config (NVIDIA Puzzle's heterogeneous Llama), written by
blockdistill. `block_configs` holds one {"attention": ..., "ffn": ...} entry per layer;
each section is read as attributes, as the DeciLM loaders read it."""

from transformers import PretrainedConfig

#: the loaders round `ffn_mult` widths up to a multiple of this
FFN_ROUNDING = 256


def intermediate_size(ffn, hidden_size):
    """The MLP width of an `ffn` section: from `ffn_mult` as the DeciLM loaders compute it
    (2/3 of ffn_mult x hidden_size, truncated, rounded up to a multiple of 256), else the
    exact `intermediate_size`."""
    if getattr(ffn, "ffn_mult", None) is not None:
        width = int(2 * ffn.ffn_mult * hidden_size / 3)
        return width if width % FFN_ROUNDING == 0 else width + FFN_ROUNDING - width % FFN_ROUNDING
    return int(ffn.intermediate_size)


class Section:
    """The `attention` or `ffn` settings of one layer; only the keys of config.json are
    attributes (besides `no_op` and `replace_with_linear`, False unless given)."""

    def __init__(self, **settings):
        self.no_op = False
        self.replace_with_linear = False
        self.__dict__.update(settings)

    def to_dict(self):
        return dict(self.__dict__)


class BlockConfig:
    """One layer: its `attention` and `ffn` sections."""

    def __init__(self, attention=None, ffn=None, **rest):
        if rest:
            raise ValueError(f"block_configs entries hold only 'attention' and 'ffn', not {sorted(rest)}")
        self.attention = attention if isinstance(attention, Section) else Section(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, Section) else Section(**(ffn or {}))

    def to_dict(self):
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=None,
        block_configs=None,
        num_hidden_layers=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        hidden_act="silu",
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs or []]
        self.num_hidden_layers = len(self.block_configs) if num_hidden_layers is None else num_hidden_layers
        if self.num_hidden_layers != len(self.block_configs):
            raise ValueError(
                f"num_hidden_layers={self.num_hidden_layers} but block_configs has {len(self.block_configs)} entries"
            )
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        if isinstance(getattr(type(self), "rope_scaling", None), property):  # transformers 5: rope_parameters
            self.rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
        else:
            self.rope_scaling = rope_scaling
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        self.attention_bias = False
        self.mlp_bias = False
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [block.to_dict() for block in self.block_configs]
        return out
'''

MODELING_CODE = '''\
"""A DeciLM / Nemotron-NAS causal LM in torch, written by blockdistill for the checkpoints
it exports. Every layer is pre-norm Llama with its own shape: attention with
`num_attention_heads // n_heads_in_group` KV heads (query head h reads KV head
h // n_heads_in_group) or none (`no_op`), then a SwiGLU MLP of its own width or none; a
layer with neither is the identity. Either section may instead be `replace_with_linear`: a
`hidden_size x hidden_size` map of the section's normed input (`linear_attn` /
`linear_mlp`)."""

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_blockdistill_decilm import DeciLMConfig, intermediate_size

#: what the exporter writes; anything else in a block's section is refused
_UNSUPPORTED = ("sparsify", "window_length", "num_sink_tokens", "llama4", "mamba", "moe")


def with_cache(output_class, cache, **fields):
    """An output holding the KV cache under the name of this transformers version
    (`cache` in 5.x, `past_key_values` before)."""
    key = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**{key: cache}, **fields)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def inverse_frequencies(config):
    """RoPE inverse frequencies (float32), with Llama-3 `rope_scaling` when given."""
    head_dim = config.head_dim
    scaling = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = scaling.get("rope_theta", config.rope_theta)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported here; only 'llama3'")
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x, cos, sin):
    """Rotary embedding, "rotate half" convention; x: [batch, heads, seq, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, n_kv_heads, config.head_dim
        dim, q_width, kv_width = config.hidden_size, self.n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, q_width, bias=False)
        self.k_proj = nn.Linear(dim, kv_width, bias=False)
        self.v_proj = nn.Linear(dim, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, cache_index):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, cache_index)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim) + mask
        heads = scores.softmax(dim=-1).to(v.dtype) @ v
        return self.o_proj(heads.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim, width):
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearAttention(nn.Module):
    """A `replace_with_linear` attention: one map of the normed input (no cache)."""

    def __init__(self, dim):
        super().__init__()
        self.linear_attn = nn.Linear(dim, dim, bias=False)

    def forward(self, x, *unused):
        return self.linear_attn(x)


class LinearMLP(nn.Module):
    """A `replace_with_linear` FFN: one map of the normed input."""

    def __init__(self, dim):
        super().__init__()
        self.linear_mlp = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DecoderLayer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        block = config.block_configs[index]
        for name, section in (("attention", block.attention), ("ffn", block.ffn)):
            used = [key for key in _UNSUPPORTED if getattr(section, key, None) not in (None, False)]
            if used:
                raise ValueError(f"layer {index}: {name} uses {used}, which this modeling file does not implement")
        if block.ffn.to_dict().get("hidden_act", "silu") not in (None, "silu"):
            raise ValueError(f"layer {index}: only the silu MLP is implemented")
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        self.has_cache = False  # whether the layer keeps keys and values
        if not block.attention.no_op:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if block.attention.replace_with_linear:
                self.self_attn = LinearAttention(config.hidden_size)
            else:
                self.self_attn = Attention(config, config.num_attention_heads // block.attention.n_heads_in_group)
                self.has_cache = True
        if not block.ffn.no_op:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if block.ffn.replace_with_linear:
                self.mlp = LinearMLP(config.hidden_size)
            else:
                self.mlp = MLP(config.hidden_size, intermediate_size(block.ffn, config.hidden_size))

    def forward(self, x, cos, sin, mask, cache, cache_index):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        """Nothing: an exported checkpoint holds every weight (and a fresh model keeps
        torch's own initialisation)."""


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # the KV cache holds the attention layers only, numbered in order
        attention_layers = [i for i, layer in enumerate(self.layers) if layer.has_cache]
        self.cache_index = {layer: slot for slot, layer in enumerate(attention_layers)}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
        use_cache=None, output_hidden_states=None, past_key_values=None, **kwargs,
    ):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        cache = past_key_values if cache is None else cache  # the name before transformers 5
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and self.cache_index:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None and self.cache_index else 0
        cache_position = torch.arange(past, past + seq, device=x.device)
        if position_ids is None:
            position_ids = cache_position[None].expand(batch, -1)
        angles = position_ids[:, None, :, None].float() * inverse_frequencies(self.config).to(x.device)
        cos = torch.cat((angles, angles), dim=-1).cos().to(x.dtype)
        sin = torch.cat((angles, angles), dim=-1).sin().to(x.dtype)
        key_positions = torch.arange(past + seq, device=x.device)
        allowed = key_positions[None, None, None, :] <= cache_position[None, None, :, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, : past + seq].bool()
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden_states = []
        cache = cache if use_cache else None
        for index, layer in enumerate(self.layers):
            hidden_states.append(x)
            x = layer(x, cos, sin, mask, cache, self.cache_index.get(index))
        x = self.norm(x)
        hidden_states.append(x)
        return with_cache(
            BaseModelOutputWithPast, cache, last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # transformers 5 names the tied pair; 4.x lists the tied weight
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
        labels=None, use_cache=None, output_hidden_states=None, logits_to_keep=0, past_key_values=None, **kwargs,
    ):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=past_key_values if cache is None else cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        cache = out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits, hidden_states=out.hidden_states)
'''
