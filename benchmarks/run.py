"""blockdistill benchmark suite: throughput, MFU, a PyTorch peer, compile time and memory.

Run from the repository root:

    python benchmarks/run.py --quick --json out.json    # a few minutes on 2 CPU cores
    python benchmarks/run.py --json full.json           # the medium config of the issue

Everything is measured in one process, side by side, so that the ratios are meaningful on
a noisy machine: the step variants are timed round-robin (one step of each variant per
round, every other round in reverse order), every ratio is the median over rounds of the
per-round ratio, and tokens/s and MFU use each variant's best round (see
`benchmarks/README.md`). What is measured:

1. `matmul_gflops`: best-of-N jitted fp32 square matmul, the machine's practical limit.
2. The distillation steps on the "medium" models (a teacher and a student with fewer KV
   heads and half the MLP width), as `bd.DistillStep` runs them (`STEPS`): blockwise at
   attention level (the default objective) and at layer level, fused; the same unfused
   with the injected pass as `scan` and as `vmap` (the path before the fused step); KD,
   KD + 0.5 label CE, and the main job's default recipe (layer-level blockwise + 0.5 label
   CE). Tokens/s, and MFU = analytic model FLOPs of the step / median step time /
   `matmul_gflops` (see `benchmarks/README.md`), per step (`mfu_by_step`; `mfu_min` over
   the kinds the library runs by default, not the unfused reference rows).
3. Time ratios, each beside its FLOP ratio (`*_flops`): `blockwise_vs_kd`,
   `blockwise_layer_vs_kd`, `default_vs_kdce`; and `fused_vs_unfused` per level.
4. Compile + first-step time of the blockwise step at several depths, scanned and
   unrolled: `scan_compile_ratio` = scan(deepest) / scan(shallowest), and the same for
   unrolled.
5. `temp_bytes`: compiled temporary bytes (`memory_analysis()`) of the blockwise and KD
   steps by depth, with and without remat; `temp_growth` (default blockwise step, deepest
   / shallowest, no remat) and `temp_per_layer_vs_grad` (the bytes each added layer costs
   / one student layer's parameter bytes, the gradient that must exist).
6. `vs_torch` / `vs_torch_layer`: the same blockwise steps written the usual PyTorch way
   (Hugging Face `LlamaForCausalLM`; hooks capture the teacher's block inputs and
   outputs, the student's blocks run on the teacher's inputs, cosine loss, AdamW), same
   shapes, threads and dtype: torch time / ours, at attention level against our default
   blockwise step (`vs_torch`) and at layer level against our layer step
   (`vs_torch_layer`), both as the library runs them (fused); `vs_torch_unfused_layer`
   against the unfused layer step the peer was first compared with.
7. `vmap_vs_scan`: layer-parallel `vmap` vs `scan` for the unfused injected pass, per
   level.
8. `kd_cached_vs_kd`: the KD step reading the teacher's top-64 logits from a cache
   (`teacher_logits=`, no teacher forward) against the KD step that runs the teacher,
   timed round-robin beside each other; `teacher_cache`: both steps' compiled temporary
   and argument bytes (the teacher's weights are an argument of one, the cached logits of
   the other) and a cache's bytes per token for k = 16, 64, 256. `--only cache` runs this
   section alone (with the KD step it compares against).
9. `--real FOLDER`: the KD step and the default blockwise step at a real checkpoint's
   shapes (e.g. SmolLM2-135M, 49k vocabulary) against a PyTorch peer timed in processes
   of its own: `real_vs_torch`, `real_mfu`, `real_kd_vs_student_step` and the KD step's
   temporaries with and without `logit_chunk` (`benchmarks/real.py`; run alone, it runs
   only this section). `--breakdown` also times the KD step's parts apart on both sides
   (where the time goes), `--unrolled` runs the JAX layers unrolled.

No assertion is made on any number: this is a measurement script, not a test.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import blockdistill as bd

# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one benchmark run."""

    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    # the medium teacher / student pair of sections 2, 3, 6 and 7
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    teacher_kv_heads: int
    student_kv_heads: int
    teacher_mlp_dim: int
    student_mlp_dim: int
    seq_len: int
    batch: int
    rounds: int  # timed steps per variant (round-robin)
    # the depth sweep of sections 4 and 5 (small widths: compile time and memory scaling)
    depths: tuple[int, ...]
    sweep_dim: int
    sweep_heads: int
    sweep_mlp_dim: int
    sweep_seq_len: int
    sweep_batch: int
    remats: tuple[str, ...]


FULL = Sizes(
    matmul_sizes=(1024, 2048, 4096),
    matmul_repeats=10,
    vocab_size=256,
    dim=512,
    n_layers=8,
    n_heads=8,
    teacher_kv_heads=4,
    student_kv_heads=2,
    teacher_mlp_dim=1408,
    student_mlp_dim=704,
    seq_len=512,
    batch=8,
    rounds=4,
    depths=(4, 16, 48),
    sweep_dim=128,
    sweep_heads=4,
    sweep_mlp_dim=352,
    sweep_seq_len=256,
    sweep_batch=4,
    remats=("none", "full", "dots"),
)

QUICK = Sizes(
    matmul_sizes=(512, 1024, 2048),
    matmul_repeats=8,
    vocab_size=256,
    dim=256,
    n_layers=4,
    n_heads=8,
    teacher_kv_heads=4,
    student_kv_heads=2,
    teacher_mlp_dim=704,
    student_mlp_dim=352,
    seq_len=256,
    batch=4,
    rounds=5,
    depths=(4, 16, 48),
    sweep_dim=64,
    sweep_heads=4,
    sweep_mlp_dim=176,
    sweep_seq_len=64,
    sweep_batch=2,
    remats=("none", "full", "dots"),
)

TARGETS = {
    "mfu": (">=", 0.6),
    "mfu_min": (">=", 0.5),  # every step kind the library runs by default
    "vs_torch": (">=", 1.2),
    "vs_torch_layer": (">=", 1.2),
    "scan_compile_ratio": ("<=", 1.5),
    "blockwise_vs_kd": ("<=", 0.7),
    # each time ratio within 1.1x of its FLOP ratio
    "blockwise_vs_kd_over_flops": ("<=", 1.1),
    "blockwise_layer_vs_kd_over_flops": ("<=", 1.1),
    "default_vs_kdce_over_flops": ("<=", 1.1),
    "temp_per_layer_vs_grad": ("<=", 1.5),
    "remat_temp_growth": (
        "<=",
        1.1,
    ),  # "flat in depth": temp(deepest) / temp(shallowest)
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_threads() -> int:
    """The cores this process may run on (XLA's CPU thread pool uses as many)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- configs


def teacher_config(sizes: Sizes, **changes: Any) -> bd.TransformerConfig:
    cfg = bd.TransformerConfig(
        vocab_size=sizes.vocab_size,
        dim=sizes.dim,
        n_layers=sizes.n_layers,
        n_heads=sizes.n_heads,
        n_kv_heads=sizes.teacher_kv_heads,
        mlp_dim=sizes.teacher_mlp_dim,
        max_seq_len=sizes.seq_len,
    )
    return cfg.replace(**changes)


def student_config(sizes: Sizes, **changes: Any) -> bd.TransformerConfig:
    cfg = teacher_config(sizes).replace(
        n_kv_heads=sizes.student_kv_heads, mlp_dim=sizes.student_mlp_dim
    )
    return cfg.replace(**changes)


def sweep_configs(
    sizes: Sizes, depth: int, **changes: Any
) -> tuple[bd.TransformerConfig, bd.TransformerConfig]:
    teacher = bd.TransformerConfig(
        vocab_size=sizes.vocab_size,
        dim=sizes.sweep_dim,
        n_layers=depth,
        n_heads=sizes.sweep_heads,
        n_kv_heads=sizes.sweep_heads // 2,
        mlp_dim=sizes.sweep_mlp_dim,
        max_seq_len=sizes.sweep_seq_len,
        **changes,
    )
    student = teacher.replace(n_kv_heads=1, mlp_dim=sizes.sweep_mlp_dim // 2)
    return teacher, student


#: step kinds: name -> (DistillationObjective keyword arguments, DistillStep's `fused`).
#: The unfused `*_scan` / `*_vmap` variants are the path the library ran before the fused
#: step (and still runs on a mesh with a `layers` axis), kept for the side-by-side ratios.
STEPS: dict[str, tuple[dict[str, Any], str | bool]] = {
    "blockwise_attention": ({"blockwise_weight": 1.0, "inject_at": "attention"}, "auto"),
    "blockwise_layer": ({"blockwise_weight": 1.0, "inject_at": "layer"}, "auto"),
    "blockwise_attention_scan": (
        {"blockwise_weight": 1.0, "inject_at": "attention", "injected_pass": "scan"}, False
    ),
    "blockwise_attention_vmap": (
        {"blockwise_weight": 1.0, "inject_at": "attention", "injected_pass": "vmap"}, False
    ),
    "blockwise_layer_scan": (
        {"blockwise_weight": 1.0, "inject_at": "layer", "injected_pass": "scan"}, False
    ),
    "blockwise_layer_vmap": (
        {"blockwise_weight": 1.0, "inject_at": "layer", "injected_pass": "vmap"}, False
    ),
    "kd": ({"blockwise_weight": 0.0}, "auto"),
    "kdce": ({"blockwise_weight": 0.0, "label_weight": 0.5}, "auto"),
    # the main job's default recipe: layer-level cosine blockwise + 0.5 label CE
    "default": ({"blockwise_weight": 1.0, "inject_at": "layer", "label_weight": 0.5}, "auto"),
}
#: what the default `DistillationObjective(blockwise_weight=1.0)` runs (fused)
DEFAULT_BLOCKWISE = "blockwise_attention"
#: the layer-level blockwise step as the library runs it now (fused)
LAYER_BLOCKWISE = "blockwise_layer"
#: the layer-level step the PyTorch peer was first compared with (unfused, vmap)
UNFUSED_LAYER = "blockwise_layer_vmap"
#: the PyTorch peers: name -> (blockwise level, our step doing the same work)
TORCH_PEERS = {
    "torch_blockwise_attention": ("attention", DEFAULT_BLOCKWISE),
    "torch_blockwise_layer": ("layer", LAYER_BLOCKWISE),
}


def make_step(kind: str, optimizer) -> "bd.DistillStep":
    kwargs, fused = STEPS[kind]
    return bd.DistillStep(bd.DistillationObjective(**kwargs), optimizer, fused=fused)


# ----------------------------------------------------------------------------- FLOPs


def step_flops(
    kind: str,
    teacher: bd.TransformerConfig,
    student: bd.TransformerConfig,
    seq_len: int,
    batch: int,
) -> float:
    """Model FLOPs of one step of `kind` (`bd.step_flops` of its objective; see
    benchmarks/README.md)."""
    objective = bd.DistillationObjective(**STEPS[kind][0])
    return bd.step_flops(objective, teacher, student, seq_len=seq_len, batch=batch)


# ----------------------------------------------------------------------------- 1. matmul


def measure_matmul(sizes: Sizes) -> dict[str, Any]:
    """Best-of-N GFLOP/s of a jitted fp32 `a @ b` for each square size; the max is the limit."""
    matmul = jax.jit(jnp.matmul)
    per_size = {}
    for n in sizes.matmul_sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        matmul(a, b).block_until_ready()
        best = float("inf")
        for _ in range(sizes.matmul_repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
        per_size[str(n)] = 2.0 * n**3 / best / 1e9
        log(f"  matmul {n}x{n}: {per_size[str(n)]:.1f} GFLOP/s")
    return {"gflops": max(per_size.values()), "per_size": per_size}


# ----------------------------------------------------------------------------- 2, 3, 7: steps


@contextlib.contextmanager
def counting_compiles():
    """The backend compilations that happen inside the block (a list that grows)."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class CachedKDRunner:
    """The KD step fed the teacher's cached top-k logits (`teacher_logits=`): the teacher
    does not run."""

    def __init__(self, student: bd.Transformer, cached: "bd.TopKLogits", tokens, mask):
        self.optimizer = bd.make_optimizer(1e-3)
        self.student = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student)
        self.opt_state = self.optimizer.init(eqx.filter(self.student, eqx.is_array))
        self.step = make_step("kd", self.optimizer)
        self.cached, self.tokens, self.mask = cached, tokens, mask
        self.index = 0

    def __call__(self) -> None:
        self.student, self.opt_state, metrics = self.step(
            self.student, self.opt_state, None, self.tokens, self.mask, self.index, teacher_logits=self.cached
        )
        metrics["loss"].block_until_ready()
        self.index += 1


CACHE_TOP_K = 64


def measure_teacher_cache(sizes, t_cfg, s_cfg, teacher, student, tokens, mask) -> dict[str, Any]:
    """Section 8 alone: KD from the teacher vs KD from its cached top-k logits, timed
    round-robin, with both steps' compiled memory and the cache's bytes per token."""
    logits = jax.jit(lambda t, x: jax.vmap(t)(x).logits)(teacher, tokens)
    cached = bd.top_k_logits(logits, CACHE_TOP_K)
    runners = {"kd": JaxStepRunner("kd", student, teacher, tokens, mask),
               "kd_cached": CachedKDRunner(student, cached, tokens, mask)}
    first_call = {}
    for name, runner in runners.items():
        start = time.perf_counter()
        runner()
        first_call[name] = time.perf_counter() - start
    wall, cpu = round_robin(runners, sizes.rounds)
    optimizer = bd.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    memory = {}
    for name, lowered in (
        ("kd", make_step("kd", optimizer).lower(student, opt_state, teacher, tokens, mask, 0)),
        ("kd_cached", make_step("kd", optimizer).lower(student, opt_state, None, tokens, mask, 0,
                                                      teacher_logits=cached)),
    ):
        analysis = lowered.compile().memory_analysis()
        memory[name] = {"temp_bytes": int(analysis.temp_size_in_bytes),
                        "argument_bytes": int(analysis.argument_size_in_bytes)}
    objective = bd.DistillationObjective(**STEPS["kd"][0])
    flops = {"kd": bd.step_flops(objective, t_cfg, s_cfg, seq_len=sizes.seq_len, batch=sizes.batch),
             "kd_cached": bd.step_flops(objective, t_cfg, s_cfg, seq_len=sizes.seq_len, batch=sizes.batch,
                                        cached=True)}
    tokens_per_step = sizes.batch * sizes.seq_len
    return {
        "top_k": CACHE_TOP_K,
        "kd_cached_vs_kd": statistics.median(a / b for a, b in zip(wall["kd_cached"], wall["kd"])),
        "kd_cached_vs_kd_cpu": statistics.median(cpu["kd_cached"]) / statistics.median(cpu["kd"]),
        "kd_cached_vs_kd_flops": flops["kd_cached"] / flops["kd"],
        "steps": {name: {"min_s": min(wall[name]), "median_s": statistics.median(wall[name]),
                         "times_s": wall[name], "first_call_s": first_call[name],
                         "tokens_per_s": tokens_per_step / statistics.median(wall[name]),
                         "model_gflop": flops[name] / 1e9} for name in runners},
        "memory": memory,
        "bytes_per_token": {str(k): bd.bytes_per_token(k) for k in (16, 64, 256)},
    }


def cache_table(cache: dict[str, Any]) -> str:
    kd, cached = cache["steps"]["kd"], cache["steps"]["kd_cached"]
    mem_kd, mem_cached = cache["memory"]["kd"], cache["memory"]["kd_cached"]
    lines = [
        f"### 8. KD from a teacher cache (top {cache['top_k']})",
        "",
        "| step | median s | tokens/s | model GFLOP | compiled temp MiB | arguments MiB |",
        "|---|---|---|---|---|---|",
        f"| KD, teacher runs | {kd['median_s']:.3f} | {kd['tokens_per_s']:.0f} | {kd['model_gflop']:.1f} | "
        f"{mem_kd['temp_bytes'] / 2**20:.1f} | {mem_kd['argument_bytes'] / 2**20:.1f} |",
        f"| KD from the cache | {cached['median_s']:.3f} | {cached['tokens_per_s']:.0f} | "
        f"{cached['model_gflop']:.1f} | {mem_cached['temp_bytes'] / 2**20:.1f} | "
        f"{mem_cached['argument_bytes'] / 2**20:.1f} |",
        "",
        f"`kd_cached_vs_kd` (time, median of per-round ratios) = {cache['kd_cached_vs_kd']:.3f} "
        f"(CPU time {cache['kd_cached_vs_kd_cpu']:.3f}; FLOPs {cache['kd_cached_vs_kd_flops']:.3f}). "
        "Cache bytes per token: " + ", ".join(f"k={k}: {v}" for k, v in cache["bytes_per_token"].items()) + ".",
    ]
    return "\n".join(lines)


def synthetic_batch(sizes_vocab: int, batch: int, seq_len: int, seed: int = 1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, sizes_vocab)
    mask = jnp.ones((batch, seq_len), bool)
    return tokens, mask


class JaxStepRunner:
    """Holds one student / optimizer state and runs the public `bd.DistillStep` on it."""

    def __init__(
        self,
        kind: str,
        student: bd.Transformer,
        teacher,
        tokens,
        mask,
    ):
        self.optimizer = bd.make_optimizer(1e-3)
        # the step donates the student: give each runner its own copy of the buffers
        self.student = jax.tree.map(
            lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student
        )
        self.opt_state = self.optimizer.init(eqx.filter(self.student, eqx.is_array))
        self.step = make_step(kind, self.optimizer)
        self.teacher, self.tokens, self.mask = teacher, tokens, mask
        self.index = 0
        self.last_loss = None

    def __call__(self) -> None:
        self.student, self.opt_state, metrics = self.step(
            self.student,
            self.opt_state,
            self.teacher,
            self.tokens,
            self.mask,
            self.index,
        )
        metrics["loss"].block_until_ready()
        self.last_loss = metrics["loss"]
        self.index += 1


def xla_flops(kind, teacher, student, tokens, mask) -> float | None:
    """XLA's (pre-optimisation) FLOP count of the step; loops count their body once."""
    optimizer = bd.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    lowered = make_step(kind, optimizer).lower(student, opt_state, teacher, tokens, mask, 0)
    cost = lowered.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    return None if not cost else float(cost.get("flops", 0.0))


def round_robin(
    runners: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One call of each runner per round; returns each runner's wall and CPU times.

    Every other round runs the runners in reverse order, so that a load that drifts
    during a round does not always favour the same ones. CPU time is this process's
    (all threads') CPU seconds: it grows much less than wall time when other processes
    take the cores.
    """
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        log(
            f"  round {index + 1}: "
            + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in wall.items())
        )
    return wall, cpu


class MatmulRunner:
    """One timed square matmul per round, so the limit is also sampled beside the steps."""

    def __init__(self, n: int):
        self.n = n
        self.matmul = jax.jit(jnp.matmul)
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.matmul(self.a, self.b).block_until_ready()
        self.gflops: list[float] = []

    def __call__(self) -> None:
        start = time.perf_counter()
        self.matmul(self.a, self.b).block_until_ready()
        self.gflops.append(2.0 * self.n**3 / (time.perf_counter() - start) / 1e9)


# ----------------------------------------------------------------------------- 6. torch


class TorchBlockwisePeer:
    """The blockwise step written the way a PyTorch user would, at either level.

    Hugging Face `LlamaForCausalLM` teacher and student with the same weights as ours
    (exported with `bd.to_hf`); only the decoder stacks run (`model.model`), no LM head.

    - `level="layer"`: forward pre-hooks / hooks on the teacher's decoder layers capture
      each layer's input and output; forward pre-hooks on the student's layers replace
      each layer's input hidden state by the teacher's (the approach of NVIDIA
      Model-Optimizer's layerwise distillation), and one student forward runs every block.
    - `level="attention"`: hooks on the teacher's attention modules capture each one's
      (normed) input, its call's rotary embeddings and mask, and its output; the student
      then calls each of its own attention modules on the teacher's input (a loop over
      layers: the student's MLPs, which an attention-level loss never reads, do not run).

    The loss is the cosine distance of each student block's output to the teacher's,
    averaged over tokens and layers; backward, global-norm clipping at 1.0 and AdamW
    (lr 1e-3, betas (0.9, 0.95), eps 1e-8, no decay), like `bd.make_optimizer(1e-3)`.
    """

    def __init__(
        self, teacher_dir: str, student_dir: str, tokens: np.ndarray, threads: int, level: str
    ):
        import torch
        import transformers

        self.torch = torch
        self.level = level
        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
        self.teacher = transformers.LlamaForCausalLM.from_pretrained(
            teacher_dir, **load
        ).eval()
        self.teacher.requires_grad_(False)
        self.student = transformers.LlamaForCausalLM.from_pretrained(
            student_dir, **load
        ).train()
        self.input_ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.teacher_in: dict[int, Any] = {}
        self.teacher_kwargs: dict[int, dict] = {}
        self.teacher_out: dict[int, Any] = {}
        self.student_out: dict[int, Any] = {}
        for index, layer in enumerate(self.teacher.model.layers):
            module = layer if level == "layer" else layer.self_attn
            module.register_forward_pre_hook(self._capture_input(index), with_kwargs=True)
            module.register_forward_hook(self._capture_output(self.teacher_out, index))
        if level == "layer":
            for index, layer in enumerate(self.student.model.layers):
                layer.register_forward_pre_hook(self._inject(index), with_kwargs=True)
                layer.register_forward_hook(self._capture_output(self.student_out, index))
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
        )
        self.last_loss = None

    def _capture_input(self, index: int):
        def hook(module, args, kwargs):
            self.teacher_in[index] = args[0] if args else kwargs["hidden_states"]
            self.teacher_kwargs[index] = kwargs

        return hook

    @staticmethod
    def _capture_output(store: dict, index: int):
        def hook(module, args, output):
            store[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def _inject(self, index: int):
        def hook(module, args, kwargs):
            injected = self.teacher_in[index]
            if args:
                return (injected, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": injected}

        return hook

    def loss(self):
        torch = self.torch
        with torch.no_grad():
            self.teacher.model(input_ids=self.input_ids, use_cache=False)
        layers = self.student.model.layers
        if self.level == "layer":
            self.student.model(input_ids=self.input_ids, use_cache=False)
            outputs = [self.student_out[i] for i in range(len(layers))]
        else:
            outputs = []
            for i, layer in enumerate(layers):
                kwargs = self.teacher_kwargs[i]
                outputs.append(layer.self_attn(
                    hidden_states=self.teacher_in[i],
                    position_embeddings=kwargs["position_embeddings"],
                    attention_mask=kwargs.get("attention_mask"),
                )[0])
        per_layer = [
            (
                1.0
                - torch.nn.functional.cosine_similarity(
                    out, self.teacher_out[i], dim=-1, eps=1e-6
                )
            ).mean()
            for i, out in enumerate(outputs)
        ]
        return torch.stack(per_layer).mean()

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.last_loss = float(loss.detach())


def torch_matmul_gflops(sizes: Sizes) -> float:
    """The same best-of-N fp32 square matmul in torch (its BLAS), for reference."""
    import torch

    best_rate = 0.0
    for n in sizes.matmul_sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        for _ in range(sizes.matmul_repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best_rate = max(best_rate, 2.0 * n**3 / (time.perf_counter() - start) / 1e9)
    return best_rate


# ----------------------------------------------------------------------------- 4, 5: sweep


def compile_step(kind: str, teacher_cfg, student_cfg, sizes: Sizes, run: bool):
    """AOT-compile one distillation step; returns timings, memory and XLA FLOPs."""
    teacher = bd.Teacher(bd.Transformer(teacher_cfg, key=jax.random.key(0)))
    student = bd.Transformer(student_cfg, key=jax.random.key(2))
    tokens, mask = synthetic_batch(
        sizes.vocab_size, sizes.sweep_batch, sizes.sweep_seq_len
    )
    optimizer = bd.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(student, eqx.is_array))
    # the step's (frozen, student, opt_state); frozen: teacher, batch, step, segments, cached logits
    frozen = (teacher, tokens, mask, jnp.int32(0), None, None)
    start = time.perf_counter()
    lowered = make_step(kind, optimizer).lower(student, opt_state, teacher, tokens, mask, 0)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    result: dict[str, Any] = {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
    }
    if run:
        out = compiled(frozen, student, opt_state)
        jax.block_until_ready(out)
        result["first_step_s"] = time.perf_counter() - compiled_at
        result["total_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result["temp_bytes"] = int(memory.temp_size_in_bytes)
    result["argument_bytes"] = int(memory.argument_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    result["xla_flops"] = float(cost.get("flops", 0.0)) if cost else None
    result["model_flops"] = step_flops(
        kind, teacher_cfg, student_cfg, sizes.sweep_seq_len, sizes.sweep_batch
    )
    return result


def run_sweep(sizes: Sizes) -> dict[str, Any]:
    # warm up XLA and the tracing caches of the package so that the first depth is not
    # charged for one-off initialisation
    teacher_cfg, student_cfg = sweep_configs(sizes, 2)
    compile_step(DEFAULT_BLOCKWISE, teacher_cfg, student_cfg, sizes, run=True)
    compile_times: dict[str, dict[str, Any]] = {"scan": {}, "unrolled": {}}
    temp_bytes: dict[str, dict[str, dict[str, int]]] = {
        kind: {remat: {} for remat in sizes.remats}
        for kind in ("blockwise_attention", "blockwise_layer", "kd")
    }
    unrolled_temp: dict[str, int] = {}
    xla_check = {}
    for mode in ("scan", "unrolled"):
        for depth in sizes.depths:
            teacher_cfg, student_cfg = sweep_configs(
                sizes, depth, scan_layers=mode == "scan"
            )
            result = compile_step(
                DEFAULT_BLOCKWISE, teacher_cfg, student_cfg, sizes, run=True
            )
            compile_times[mode][str(depth)] = result
            log(
                f"  {mode:8s} depth {depth:3d}: lower {result['lower_s']:.2f}s compile "
                f"{result['compile_s']:.2f}s first step {result['first_step_s']:.2f}s, "
                f"temp {result['temp_bytes'] / 2**20:.1f} MiB"
            )
            if mode == "scan":
                temp_bytes["blockwise_attention"]["none"][str(depth)] = result[
                    "temp_bytes"
                ]
            else:
                unrolled_temp[str(depth)] = result["temp_bytes"]
                # an unrolled program is counted in full by XLA (a scan's body only once)
                xla_check[str(depth)] = {
                    "xla_flops": result["xla_flops"],
                    "model_flops": result["model_flops"],
                    "xla_over_model": (result["xla_flops"] or 0.0)
                    / result["model_flops"],
                }
    kinds = {
        "blockwise_attention": DEFAULT_BLOCKWISE,
        "blockwise_layer": LAYER_BLOCKWISE,
        "kd": "kd",
    }
    for name, kind in kinds.items():
        for remat in sizes.remats:
            for depth in sizes.depths:
                if str(depth) in temp_bytes[name][remat]:
                    continue
                teacher_cfg, student_cfg = sweep_configs(sizes, depth)
                student_cfg = student_cfg.replace(remat=remat)
                result = compile_step(kind, teacher_cfg, student_cfg, sizes, run=False)
                temp_bytes[name][remat][str(depth)] = result["temp_bytes"]
                log(
                    f"  temp {name:20s} remat={remat:5s} depth {depth:3d}: {result['temp_bytes'] / 2**20:.1f} MiB"
                )
    return {
        "compile": compile_times,
        "temp_bytes": temp_bytes,
        "temp_bytes_unrolled_blockwise_attention": unrolled_temp,
        "xla_flops_check_unrolled": xla_check,
    }


# ----------------------------------------------------------------------------- report


def compile_ratio(times: dict[str, dict[str, Any]], depths: tuple[int, ...]) -> float:
    return times[str(depths[-1])]["total_s"] / times[str(depths[0])]["total_s"]


def state_bytes_per_layer(sizes: Sizes) -> dict[str, int]:
    """The bytes per layer that any blockwise step must hold: two teacher states per layer
    (`attn_in`/`attn_out` or `layer_in`/`layer_out`) and one gradient of the student layer."""
    _, student_cfg = sweep_configs(sizes, 1)
    student = bd.Transformer(student_cfg, key=jax.random.key(0))
    layer_params = sum(
        x.size for x in jax.tree.leaves(eqx.filter(student.layers, eqx.is_array))
    )
    states = 2 * sizes.sweep_batch * sizes.sweep_seq_len * sizes.sweep_dim * 4
    return {"teacher_states": states, "student_gradient": 4 * int(layer_params)}


def format_table(results: dict[str, Any], sizes: Sizes) -> str:
    lines = []
    add = lines.append
    add(
        f"matmul limit: {results['matmul_gflops']:.1f} GFLOP/s (jitted fp32 square matmul, best of "
        f"{sizes.matmul_repeats} per size for sizes {', '.join(map(str, sizes.matmul_sizes))}, and of one "
        f"sample per timed round)"
    )
    add("")
    cfg = results["config"]
    add(
        f"steps: teacher {cfg['teacher']}, student {cfg['student']}, batch {sizes.batch} x seq {sizes.seq_len}, "
        f"{sizes.rounds} timed rounds, {results['meta']['threads']} threads"
    )
    add("")
    add(
        "| step | best s | median s | CPU s (median) | tokens/s (best) | model GFLOP | MFU (best) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|")
    for name, step in results["steps"].items():
        add(
            f"| {name} | {step['min_s']:.3f} | {step['median_s']:.3f} | {step['cpu_median_s']:.2f} | "
            f"{step['tokens_per_s']:.0f} | {step['model_gflop']:.1f} | {step['mfu']:.3f} |"
        )
    add("")
    if results.get("torch"):
        torch_info = results["torch"]
        add(
            f"PyTorch peer: torch {torch_info['torch']}, transformers {torch_info['transformers']}, "
            f"{torch_info['torch_threads']} threads; step-0 loss torch / ours: "
            + ", ".join(
                f"{level} {torch_info[f'loss_step0_torch_{level}']:.6f} / {torch_info[f'loss_step0_ours_{level}']:.6f}"
                for level, _ in TORCH_PEERS.values()
            )
            + f"; torch fp32 matmul best {torch_info['torch_matmul_gflops']:.1f} GFLOP/s"
        )
        add("")
    sweep_cfg = sweep_configs(sizes, 1)[0]
    add(
        f"depth sweep: dim {sweep_cfg.dim}, {sweep_cfg.n_heads} heads, MLP {sweep_cfg.mlp_dim}, batch "
        f"{sizes.sweep_batch} x seq {sizes.sweep_seq_len}; default blockwise step (attention level), no remat"
    )
    add("")
    add(
        "| depth | scan compile+1st step s | unrolled compile+1st step s | scan temp MiB | unrolled temp MiB |"
    )
    add("|---:|---:|---:|---:|---:|")
    sweep = results["sweep"]
    for depth in sizes.depths:
        scan = sweep["compile"]["scan"][str(depth)]
        unrolled = sweep["compile"]["unrolled"][str(depth)]
        add(
            f"| {depth} | {scan['total_s']:.2f} | {unrolled['total_s']:.2f} | "
            f"{scan['temp_bytes'] / 2**20:.1f} | {unrolled['temp_bytes'] / 2**20:.1f} |"
        )
    add("")
    add("compiled temporary MiB by depth (scanned stack):")
    add("")
    add(
        "| step | remat | "
        + " | ".join(f"d={d}" for d in sizes.depths)
        + " | growth | MiB/layer |"
    )
    add("|---|---|" + "---:|" * (len(sizes.depths) + 2))
    for kind, by_remat in results["temp_bytes"].items():
        for remat, by_depth in by_remat.items():
            values = [by_depth[str(d)] for d in sizes.depths]
            slope = (values[-1] - values[0]) / (sizes.depths[-1] - sizes.depths[0])
            add(
                f"| {kind} | {remat} | "
                + " | ".join(f"{v / 2**20:.1f}" for v in values)
                + f" | {values[-1] / values[0]:.2f}x | {slope / 2**20:.3f} |"
            )
    floor = results["state_bytes_per_layer"]
    add("")
    add(
        f"per-layer floor of a blockwise step: teacher states {floor['teacher_states'] / 2**20:.3f} MiB + "
        f"student layer gradient {floor['student_gradient'] / 2**20:.3f} MiB"
    )
    add("")
    add("| ratio | value | target | met |")
    add("|---|---:|---|---|")
    for key, target in results["targets"].items():
        value = target["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        add(
            f"| {key} | {shown} | {target['target']} | {'yes' if target['met'] else 'no'} |"
        )
    add(
        f"| unrolled_compile_ratio | {results['unrolled_compile_ratio']:.3f} | (reported) | |"
    )
    for key in ("blockwise_vs_kd_flops", "blockwise_layer_vs_kd_flops", "default_vs_kdce_flops",
                "temp_growth"):
        add(f"| {key} | {results[key]:.3f} | (reported) | |")
    add("")
    add(
        "| ratio | paired (median of per-round ratios) | ratio of best times | ratio of median CPU s |"
    )
    add("|---|---:|---:|---:|")
    for key, value in results["ratios"].items():
        add(
            f"| {key} | {value:.3f} | {results['ratios_best_of'][key]:.3f} | "
            f"{results['ratios_from_cpu_time'][key]:.3f} |"
        )
    add("")
    add(
        f"recompiles of the step during the timed rounds: {results['recompiles_during_timed_steps']}"
    )
    return "\n".join(lines)


def check_targets(results: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    full_remat = results["temp_bytes"]["blockwise_attention"].get("full", {})
    growth = None
    if full_remat:
        growth = full_remat[str(sizes.depths[-1])] / full_remat[str(sizes.depths[0])]
    values = {
        "mfu": results["mfu"],
        # the step kinds as the library runs them (fused or "auto"); the unfused reference
        # rows are reported in mfu_by_step but are not a kind the library chooses on its own
        "mfu_min": min(
            mfu for name, mfu in results["mfu_by_step"].items() if STEPS[name][1] == "auto"
        ),
        "vs_torch": results["vs_torch"],
        "vs_torch_layer": results["vs_torch_layer"],
        "scan_compile_ratio": results["scan_compile_ratio"],
        "blockwise_vs_kd": results["blockwise_vs_kd"],
        "temp_per_layer_vs_grad": results["temp_per_layer_vs_grad"],
        "remat_temp_growth": growth,
    }
    for key in ("blockwise_vs_kd", "blockwise_layer_vs_kd", "default_vs_kdce"):
        values[f"{key}_over_flops"] = results[key] / results[f"{key}_flops"]
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = values[key]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        out[key] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (minutes on 2 cores)"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the results as JSON to FILE"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--only", choices=("cache",), help="run one section alone: `cache` (8)")
    parser.add_argument("--real", metavar="FOLDER",
                        help="run only the real-checkpoint section (9): benchmarks/real.py on this Hugging Face folder")
    args, rest = parser.parse_known_args(argv)
    if args.real:  # its own children: JAX and torch never share a process there
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import real

        extra = ["--json", args.json] if args.json else []
        return real.main([args.real, *extra, *(["--no-torch"] if args.no_torch else []), *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    sizes = QUICK if args.quick else FULL
    began = time.perf_counter()
    threads = cpu_threads()
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "quick": args.quick,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "jax": jax.__version__,
            "equinox": eqx.__version__,
            "blockdistill": bd.__version__,
            "backend": jax.default_backend(),
            "sizes": dataclasses.asdict(sizes),
        }
    }

    if args.only == "cache":
        t_cfg, s_cfg = teacher_config(sizes), student_config(sizes)
        teacher = bd.Teacher(bd.Transformer(t_cfg, key=jax.random.key(0)))
        student = bd.Transformer(s_cfg, key=jax.random.key(2))
        tokens, mask = synthetic_batch(sizes.vocab_size, sizes.batch, sizes.seq_len)
        log("8. KD from a teacher cache")
        results["teacher_cache"] = measure_teacher_cache(sizes, t_cfg, s_cfg, teacher, student, tokens, mask)
        results["kd_cached_vs_kd"] = results["teacher_cache"]["kd_cached_vs_kd"]
        results["elapsed_s"] = time.perf_counter() - began
        return _finish(results, cache_table(results["teacher_cache"]), args.json)

    log("1. matmul limit")
    matmul = measure_matmul(sizes)
    results["matmul_gflops"] = matmul["gflops"]
    results["matmul"] = matmul

    log("2/3/6/7. distillation steps")
    t_cfg, s_cfg = teacher_config(sizes), student_config(sizes)
    results["config"] = {
        "teacher": {
            k: v
            for k, v in t_cfg.to_dict().items()
            if k
            in ("dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "vocab_size")
        },
        "student": {
            k: v
            for k, v in s_cfg.to_dict().items()
            if k
            in ("dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "vocab_size")
        },
        "seq_len": sizes.seq_len,
        "batch": sizes.batch,
    }
    teacher_model = bd.Transformer(t_cfg, key=jax.random.key(0))
    teacher = bd.Teacher(teacher_model)
    student = bd.Transformer(s_cfg, key=jax.random.key(2))
    tokens, mask = synthetic_batch(sizes.vocab_size, sizes.batch, sizes.seq_len)

    # the losses the PyTorch peers must reproduce at step 0 (same weights, same batch)
    ours_loss0 = {}
    for level, kind in TORCH_PEERS.values():
        objective = bd.DistillationObjective(**STEPS[kind][0])
        ours_loss0[level] = float(
            eqx.filter_jit(lambda s, t, x, m, o=objective: o(s, jax.vmap(t)(x), x, m)[0])(
                student, teacher, tokens, mask
            )
        )

    runners: dict[str, Callable[[], None]] = {}
    first_call: dict[str, float] = {}
    xla: dict[str, float | None] = {}
    for name in STEPS:
        runner = JaxStepRunner(name, student, teacher, tokens, mask)
        start = time.perf_counter()
        runner()  # trace + compile + first step
        first_call[name] = time.perf_counter() - start
        xla[name] = xla_flops(name, teacher, student, tokens, mask)
        log(f"  {name}: first call (compile + step) {first_call[name]:.2f}s")
        runners[name] = runner

    torch_info: dict[str, Any] = {}
    if not args.no_torch:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as folder:
            teacher_dir = str(bd.to_hf(teacher_model, os.path.join(folder, "teacher")))
            student_dir = str(bd.to_hf(student, os.path.join(folder, "student")))
            peers = {
                name: TorchBlockwisePeer(teacher_dir, student_dir, np.asarray(tokens), threads, level)
                for name, (level, _) in TORCH_PEERS.items()
            }
        torch_info = {
            "torch_matmul_gflops": torch_matmul_gflops(sizes),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
        }
        for name, peer in peers.items():
            level = peer.level
            with torch.no_grad():
                torch_loss0 = float(peer.loss())
            start = time.perf_counter()
            peer()
            first_call[name] = time.perf_counter() - start
            runners[name] = peer
            torch_info[f"loss_step0_torch_{level}"] = torch_loss0
            torch_info[f"loss_step0_ours_{level}"] = ours_loss0[level]
            torch_info[f"loss_step0_abs_diff_{level}"] = abs(torch_loss0 - ours_loss0[level])
            log(f"  torch peer ({level}): step-0 loss {torch_loss0:.6f} vs ours {ours_loss0[level]:.6f}")

    best_size = max(matmul["per_size"], key=matmul["per_size"].get)
    matmul_runner = MatmulRunner(int(best_size))
    runners["matmul"] = matmul_runner
    with counting_compiles() as compiles:
        wall, cpu = round_robin(runners, sizes.rounds)
    results["recompiles_during_timed_steps"] = len(compiles)
    del wall["matmul"], cpu["matmul"]
    matmul["in_rounds"] = matmul_runner.gflops
    results["matmul_gflops"] = max(matmul["gflops"], *matmul_runner.gflops)

    tokens_per_step = sizes.batch * sizes.seq_len
    steps = {}
    for name, samples in wall.items():
        kind = TORCH_PEERS[name][1] if name in TORCH_PEERS else name
        flops = step_flops(kind, t_cfg, s_cfg, sizes.seq_len, sizes.batch)
        best = min(samples)
        steps[name] = {
            "min_s": best,
            "median_s": statistics.median(samples),
            "times_s": samples,
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_times_s": cpu[name],
            "first_call_s": first_call[name],
            "tokens_per_s": tokens_per_step / best,
            "tokens_per_s_median": tokens_per_step / statistics.median(samples),
            "model_gflop": flops / 1e9,
            "mfu": flops / best / (results["matmul_gflops"] * 1e9),
            "xla_gflop_scan_body_once": None
            if xla.get(name) is None
            else xla[name] / 1e9,
        }
    results["steps"] = steps

    def paired(a: str, b: str) -> float:
        """Median over rounds of the ratio of the two steps' wall times in that round."""
        return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

    def ratio(a: str, b: str, key: str) -> float:
        return steps[a][key] / steps[b][key]

    pairs = {
        "blockwise_vs_kd": (DEFAULT_BLOCKWISE, "kd"),
        "blockwise_layer_vs_kd": (LAYER_BLOCKWISE, "kd"),
        "default_vs_kdce": ("default", "kdce"),
        "fused_vs_unfused_attention": (DEFAULT_BLOCKWISE, "blockwise_attention_scan"),
        "fused_vs_unfused_layer": (LAYER_BLOCKWISE, "blockwise_layer_scan"),
        "vmap_vs_scan_attention": (
            "blockwise_attention_vmap",
            "blockwise_attention_scan",
        ),
        "vmap_vs_scan_layer": ("blockwise_layer_vmap", "blockwise_layer_scan"),
    }
    if torch_info:
        # torch time / ours on the same work as the library runs it: the default
        # (attention-level) blockwise step and the layer-level one; and against the
        # unfused layer step the peer was first compared with
        pairs["vs_torch"] = ("torch_blockwise_attention", DEFAULT_BLOCKWISE)
        pairs["vs_torch_layer"] = ("torch_blockwise_layer", LAYER_BLOCKWISE)
        pairs["vs_torch_unfused_layer"] = ("torch_blockwise_layer", UNFUSED_LAYER)
    results["ratios"] = {key: paired(a, b) for key, (a, b) in pairs.items()}
    # cross-checks: ratio of the best wall times, and of the median CPU seconds
    results["ratios_best_of"] = {
        key: ratio(a, b, "min_s") for key, (a, b) in pairs.items()
    }
    results["ratios_from_cpu_time"] = {
        key: ratio(a, b, "cpu_median_s") for key, (a, b) in pairs.items()
    }

    results["tokens_per_s"] = steps[DEFAULT_BLOCKWISE]["tokens_per_s"]
    results["mfu"] = steps[DEFAULT_BLOCKWISE]["mfu"]
    results["blockwise_vs_kd"] = results["ratios"]["blockwise_vs_kd"]
    results["blockwise_layer_vs_kd"] = results["ratios"]["blockwise_layer_vs_kd"]
    results["default_vs_kdce"] = results["ratios"]["default_vs_kdce"]
    results["fused_vs_unfused"] = {
        "attention": results["ratios"]["fused_vs_unfused_attention"],
        "layer": results["ratios"]["fused_vs_unfused_layer"],
    }
    # a time ratio cannot beat its FLOP ratio: the analytic model FLOPs of the same pairs
    for key in ("blockwise_vs_kd", "blockwise_layer_vs_kd", "default_vs_kdce"):
        a, b = pairs[key]
        results[f"{key}_flops"] = steps[a]["model_gflop"] / steps[b]["model_gflop"]
    results["mfu_by_step"] = {name: step["mfu"] for name, step in steps.items() if not name.startswith("torch")}
    results["vmap_vs_scan"] = {
        "attention": results["ratios"]["vmap_vs_scan_attention"],
        "layer": results["ratios"]["vmap_vs_scan_layer"],
    }
    if torch_info:
        results["vs_torch"] = results["ratios"]["vs_torch"]
        results["vs_torch_layer"] = results["ratios"]["vs_torch_layer"]
        results["torch"] = torch_info
    else:
        results["vs_torch"] = results["vs_torch_layer"] = None
    runners.clear()  # free the students and optimizer states before the sweep

    log("8. KD from a teacher cache")
    results["teacher_cache"] = measure_teacher_cache(sizes, t_cfg, s_cfg, teacher, student, tokens, mask)
    results["kd_cached_vs_kd"] = results["teacher_cache"]["kd_cached_vs_kd"]

    log("4/5. compile time and memory by depth")
    sweep = run_sweep(sizes)
    results["sweep"] = sweep
    results["scan_compile_ratio"] = compile_ratio(
        sweep["compile"]["scan"], sizes.depths
    )
    results["unrolled_compile_ratio"] = compile_ratio(
        sweep["compile"]["unrolled"], sizes.depths
    )
    results["temp_bytes"] = sweep["temp_bytes"]
    results["state_bytes_per_layer"] = state_bytes_per_layer(sizes)
    no_remat = sweep["temp_bytes"]["blockwise_attention"]["none"]
    shallow, deep = sizes.depths[0], sizes.depths[-1]
    results["temp_growth"] = no_remat[str(deep)] / no_remat[str(shallow)]
    per_layer = (no_remat[str(deep)] - no_remat[str(shallow)]) / (deep - shallow)
    results["temp_per_layer_vs_grad"] = per_layer / results["state_bytes_per_layer"]["student_gradient"]
    results["targets"] = check_targets(results, sizes)
    results["elapsed_s"] = time.perf_counter() - began

    table = format_table(results, sizes) + "\n\n" + cache_table(results["teacher_cache"])
    return _finish(results, table, args.json)


def _finish(results: dict[str, Any], table: str, json_path: str | None) -> dict[str, Any]:
    print(table)
    print(f"\n(total {results['elapsed_s']:.0f}s)")
    results["table"] = table
    if json_path:
        with open(json_path, "w") as file:
            json.dump(results, file, indent=2)
            file.write("\n")
    return results


if __name__ == "__main__":
    main()
