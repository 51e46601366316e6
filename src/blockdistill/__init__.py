"""blockdistill: blockwise parallel distillation of decoder-only transformers."""

import importlib.metadata

from ._attention import (
    Attention as Attention,
    RMSNorm as RMSNorm,
    segment_positions as segment_positions,
)
from ._cache import (
    TeacherCache as TeacherCache,
    TopKLogits as TopKLogits,
    build_teacher_cache as build_teacher_cache,
    bytes_per_token as bytes_per_token,
    cached_kl_divergence as cached_kl_divergence,
    model_digest as model_digest,
    top_k_logits as top_k_logits,
)
from ._config import BlockShape as BlockShape, RopeScaling as RopeScaling, TransformerConfig as TransformerConfig
from ._data import (
    Batcher as Batcher,
    CorpusFiles as CorpusFiles,
    Dataset as Dataset,
    Document as Document,
    Split as Split,
    corpus_files as corpus_files,
    default_corpus as default_corpus,
    default_corpus_root as default_corpus_root,
    eval_batches as eval_batches,
    load_dataset as load_dataset,
    pack_documents as pack_documents,
    pack_tokens as pack_tokens,
    read_corpus as read_corpus,
    split_documents as split_documents,
)
from ._hf import from_hf as from_hf, to_hf as to_hf
from ._io import load_model as load_model, save_model as save_model
from ._store import (
    PackedRows as PackedRows,
    TokenDataset as TokenDataset,
    TokenStore as TokenStore,
    batch_iterator as batch_iterator,
    run_rows as run_rows,
    token_dataset as token_dataset,
    token_store as token_store,
)
from ._tokenizers import (
    ByteTokenizer as ByteTokenizer,
    HFTokenizer as HFTokenizer,
    Tokenizer as Tokenizer,
    load_hf_tokenizer as load_hf_tokenizer,
    load_tokenizer as load_tokenizer,
)
from ._layer import MLP as MLP, DecoderLayer as DecoderLayer, block_masks as block_masks
from ._hetero import (
    block_flops_per_token as block_flops_per_token,
    block_parameters as block_parameters,
    flops_per_token as flops_per_token,
    kv_cache_bytes_per_token as kv_cache_bytes_per_token,
    own_weights as own_weights,
    parameter_count as parameter_count,
)
from ._solver import Choice as Choice, choose_blocks as choose_blocks
from ._search import (
    BlockLibrary as BlockLibrary,
    LibraryStep as LibraryStep,
    SearchSpace as SearchSpace,
    assemble_student as assemble_student,
    blockwise_scores as blockwise_scores,
    candidate_costs as candidate_costs,
    candidate_shapes as candidate_shapes,
    init_library as init_library,
    library_loss as library_loss,
    swap_scores as swap_scores,
)
from ._model import ModelOutput as ModelOutput, Transformer as Transformer
from ._flops import layer_flops as layer_flops, pretrain_flops as pretrain_flops, step_flops as step_flops
from ._objective import (
    DistillationObjective as DistillationObjective,
    chunked_logit_losses as chunked_logit_losses,
    default_layer_map as default_layer_map,
    feature_loss as feature_loss,
    kl_divergence as kl_divergence,
    next_token_cross_entropy as next_token_cross_entropy,
)
from ._parallel import (
    check_mesh as check_mesh,
    host_arrays as host_arrays,
    make_mesh as make_mesh,
    parse_mesh as parse_mesh,
    process_rows as process_rows,
    shard_batch as shard_batch,
    shard_local_batch as shard_local_batch,
    shard_model as shard_model,
    shard_opt_state as shard_opt_state,
)
from ._plan import plan_memory as plan_memory
from ._prune import (
    StudentConfig as StudentConfig,
    make_student as make_student,
    mlp_channel_importance as mlp_channel_importance,
    student_config_for as student_config_for,
)
from ._stack import LayerStack as LayerStack, LayerStates as LayerStates
from ._teacher import Teacher as Teacher
from ._train import (
    DistillStep as DistillStep,
    make_optimizer as make_optimizer,
    trainable_labels as trainable_labels,
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
    "swap_scores",
    "BlockShape",
    "Choice",
    "block_flops_per_token",
    "block_masks",
    "block_parameters",
    "choose_blocks",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "own_weights",
    "parameter_count",
    "TeacherCache",
    "TopKLogits",
    "chunked_logit_losses",
    "plan_memory",
    "build_teacher_cache",
    "bytes_per_token",
    "cached_kl_divergence",
    "model_digest",
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
    "Attention",
    "segment_positions",
    "DecoderLayer",
    "DistillStep",
    "DistillationObjective",
    "LayerStack",
    "LayerStates",
    "MLP",
    "default_layer_map",
    "feature_loss",
    "kl_divergence",
    "layer_flops",
    "pretrain_flops",
    "step_flops",
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
