"""blockdistill: blockwise parallel distillation of decoder-only transformers.

The public API, re-exported from the layers that define it (lowest first): `parallel`,
`nn`, `data`, `distill`, `interop`, `search` and `app`."""

import importlib.metadata

# meshes and sharding
from .parallel.mesh import (
    check_mesh as check_mesh,
    make_mesh as make_mesh,
    parse_mesh as parse_mesh,
)
from .parallel.sharding import (
    host_arrays as host_arrays,
    process_rows as process_rows,
    shard_batch as shard_batch,
    shard_local_batch as shard_local_batch,
    shard_model as shard_model,
    shard_opt_state as shard_opt_state,
)

# the network
from .nn.attention import (
    Attention as Attention,
    RMSNorm as RMSNorm,
    segment_positions as segment_positions,
)
from .nn.config import (
    BlockShape as BlockShape,
    RopeScaling as RopeScaling,
    TransformerConfig as TransformerConfig,
)
from .nn.costs import (
    block_flops_per_token as block_flops_per_token,
    block_parameters as block_parameters,
    flops_per_token as flops_per_token,
    kv_cache_bytes_per_token as kv_cache_bytes_per_token,
    layer_flops as layer_flops,
    parameter_count as parameter_count,
    pretrain_flops as pretrain_flops,
)
from .nn.hetero import (
    compact_layers as compact_layers,
    own_weights as own_weights,
    padded_layers as padded_layers,
)
from .nn.layer import (
    block_masks as block_masks,
    DecoderLayer as DecoderLayer,
    MLP as MLP,
)
from .nn.model import (
    ModelOutput as ModelOutput,
    Transformer as Transformer,
)
from .nn.stack import (
    LayerStack as LayerStack,
    LayerStates as LayerStates,
)
from .nn.teacher import (
    Teacher as Teacher,
)

# data
from .data.corpus import (
    corpus_files as corpus_files,
    CorpusFiles as CorpusFiles,
    default_corpus as default_corpus,
    default_corpus_root as default_corpus_root,
    Document as Document,
    read_corpus as read_corpus,
    split_documents as split_documents,
)
from .data.dataset import (
    Batcher as Batcher,
    Dataset as Dataset,
    eval_batches as eval_batches,
    load_dataset as load_dataset,
)
from .data.packing import (
    pack_documents as pack_documents,
    pack_tokens as pack_tokens,
    Split as Split,
)
from .data.pipeline import (
    batch_iterator as batch_iterator,
    run_rows as run_rows,
)
from .data.store import (
    PackedRows as PackedRows,
    token_dataset as token_dataset,
    token_store as token_store,
    TokenDataset as TokenDataset,
    TokenStore as TokenStore,
)
from .data.tokenizers import (
    ByteTokenizer as ByteTokenizer,
    HFTokenizer as HFTokenizer,
    load_hf_tokenizer as load_hf_tokenizer,
    load_tokenizer as load_tokenizer,
    Tokenizer as Tokenizer,
)

# the method
from .distill.flops import (
    step_flops as step_flops,
)
from .distill.generate import (
    generate as generate,
    Generation as Generation,
)
from .distill.onpolicy import (
    OnPolicy as OnPolicy,
    SampleScores as SampleScores,
    score_samples as score_samples,
)
from .distill.layer_map import (
    default_layer_map as default_layer_map,
)
from .distill.losses import (
    chunked_logit_losses as chunked_logit_losses,
    feature_loss as feature_loss,
    kl_divergence as kl_divergence,
    logit_divergence as logit_divergence,
    next_token_cross_entropy as next_token_cross_entropy,
)
from .distill.objective import (
    DistillationObjective as DistillationObjective,
)
from .distill.prune import (
    make_student as make_student,
    mlp_channel_importance as mlp_channel_importance,
    student_config_for as student_config_for,
    StudentConfig as StudentConfig,
)
from .distill.sparse import (
    cached_kl_divergence as cached_kl_divergence,
    tail_mass_at as tail_mass_at,
    top_k_logits as top_k_logits,
    TopKLogits as TopKLogits,
)
from .distill.step import (
    DistillStep as DistillStep,
    make_optimizer as make_optimizer,
    trainable_labels as trainable_labels,
)

# models in and out
from .interop.folders import (
    load_model as load_model,
    model_digest as model_digest,
    save_model as save_model,
)
from .interop.hf import (
    from_hf as from_hf,
    to_decilm as to_decilm,
    to_hf as to_hf,
)

# the block search
from .search.latency import (
    block_latencies as block_latencies,
)
from .search.library import (
    assemble_student as assemble_student,
    BlockLibrary as BlockLibrary,
    blockwise_scores as blockwise_scores,
    init_library as init_library,
    library_loss as library_loss,
    LibraryStep as LibraryStep,
    replacement_scores as replacement_scores,
    swap_scores as swap_scores,
)
from .search.solver import (
    Choice as Choice,
    choose_blocks as choose_blocks,
)
from .search.space import (
    candidate_costs as candidate_costs,
    candidate_shapes as candidate_shapes,
    SearchSpace as SearchSpace,
)

# the application's library parts
from .app.plan import (
    plan_memory as plan_memory,
)
from .app.teacher_cache import (
    build_teacher_cache as build_teacher_cache,
    bytes_per_token as bytes_per_token,
    TeacherCache as TeacherCache,
)

try:
    __version__ = importlib.metadata.version("blockdistill")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BlockLibrary",
    "LibraryStep",
    "SearchSpace",
    "assemble_student",
    "blockwise_scores",
    "candidate_costs",
    "candidate_shapes",
    "init_library",
    "library_loss",
    "replacement_scores",
    "swap_scores",
    "block_latencies",
    "BlockShape",
    "Choice",
    "block_flops_per_token",
    "block_masks",
    "block_parameters",
    "choose_blocks",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "own_weights",
    "padded_layers",
    "compact_layers",
    "parameter_count",
    "TeacherCache",
    "TopKLogits",
    "chunked_logit_losses",
    "plan_memory",
    "build_teacher_cache",
    "bytes_per_token",
    "cached_kl_divergence",
    "model_digest",
    "tail_mass_at",
    "top_k_logits",
    "check_mesh",
    "host_arrays",
    "make_mesh",
    "parse_mesh",
    "process_rows",
    "shard_batch",
    "shard_local_batch",
    "shard_model",
    "shard_opt_state",
    "Batcher",
    "CorpusFiles",
    "PackedRows",
    "TokenDataset",
    "TokenStore",
    "batch_iterator",
    "run_rows",
    "corpus_files",
    "token_dataset",
    "token_store",
    "ByteTokenizer",
    "Dataset",
    "Document",
    "Split",
    "StudentConfig",
    "load_model",
    "load_tokenizer",
    "make_student",
    "mlp_channel_importance",
    "save_model",
    "student_config_for",
    "default_corpus",
    "default_corpus_root",
    "eval_batches",
    "pack_documents",
    "pack_tokens",
    "split_documents",
    "HFTokenizer",
    "Tokenizer",
    "from_hf",
    "load_dataset",
    "load_hf_tokenizer",
    "read_corpus",
    "to_hf",
    "to_decilm",
    "Attention",
    "segment_positions",
    "DecoderLayer",
    "DistillStep",
    "OnPolicy",
    "SampleScores",
    "score_samples",
    "DistillationObjective",
    "LayerStack",
    "LayerStates",
    "MLP",
    "default_layer_map",
    "feature_loss",
    "kl_divergence",
    "logit_divergence",
    "layer_flops",
    "pretrain_flops",
    "step_flops",
    "generate",
    "Generation",
    "make_optimizer",
    "next_token_cross_entropy",
    "trainable_labels",
    "ModelOutput",
    "RMSNorm",
    "RopeScaling",
    "Teacher",
    "Transformer",
    "TransformerConfig",
]
