"""The speed of distillation at a real checkpoint's shapes, against a PyTorch peer.

    python benchmarks/real.py FOLDER --json real.json          # FOLDER: a Hugging Face Llama
    python benchmarks/run.py --real FOLDER --json real.json     # the same, from the suite

The teacher is the checkpoint in FOLDER (e.g. SmolLM2-135M: 30 layers, vocabulary 49,152);
the student is pruned from it to half its MLP width (the main job's student). Timed:

- `kd`: the KD step (`blockwise_weight=0`: the teacher's forward, the student's forward and
  backward, the KL over the whole vocabulary, the AdamW update), as `bd.DistillStep` runs it;
- `blockwise`: the default blockwise step (`bd.DistillationObjective()`: attention level,
  cosine, fused);
- `student`: the student's own step on labels alone (no teacher), for the teacher's share
  of a KD step (`real_kd_vs_student_step`);
- the PyTorch peer of `kd` (a `transformers` teacher forward under `no_grad`, the student's
  forward and backward, the same masked KL, global-norm clipping and AdamW) and of
  `blockwise` (hooks on the teacher's attention modules, the student's attention modules
  on the teacher's inputs, cosine loss: `TorchBlockwisePeer` of `benchmarks/run.py`).

JAX and torch never share a process (in one process torch slowed the JAX step by 1.7x at
these shapes): each side runs in child processes of its own, started alternately (jax,
torch, jax, torch, ...), each compiling / warming up first and then timing its steps; the
ratios are of the medians over every timed step of every child. `real_mfu` is the step's
analytic model FLOPs (`bd.step_flops`) / its median time / the best fp32 matmul rate the
same child measured. The compiled temporaries of the KD step are reported with and without
`logit_chunk`. No assertion is made: this is a measurement script.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
KINDS = ("kd", "blockwise", "student")
TORCH_KINDS = ("kd", "blockwise")


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 1):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, seq_len), dtype=np.int64)


def _objective(kind: str, logit_chunk: int | None = None):
    import blockdistill as bd

    if kind == "kd":
        return bd.DistillationObjective(blockwise_weight=0.0, logit_chunk=logit_chunk)
    if kind == "blockwise":
        return bd.DistillationObjective()
    return bd.DistillationObjective(blockwise_weight=0.0, teacher_weight=0.0, label_weight=1.0,
                                    logit_chunk=logit_chunk)


def _matmul_gflops(repeats: int = 8, n: int = 2048) -> float:
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(jnp.matmul)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def jax_child(args) -> dict[str, Any]:
    """Time the JAX steps in this process: every kind compiled first, then `steps` rounds
    of one step of each (every other round reversed)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import blockdistill as bd

    teacher = bd.Teacher(bd.load_model(args.teacher))
    student = bd.load_model(args.student)
    tokens = jnp.asarray(_batch(teacher.config.vocab_size, args.batch, args.seq_len), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    runners, losses, memory = {}, {}, {}
    for kind in KINDS:
        optimizer = bd.make_optimizer(1e-3)
        own = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student)
        state = {"student": own, "opt": optimizer.init(eqx.filter(own, eqx.is_array)), "index": 0}
        step = bd.DistillStep(_objective(kind), optimizer)
        memory[kind] = step.lower(own, state["opt"], teacher, tokens, mask, 0).compile().memory_analysis()

        def run(step=step, state=state, kind=kind):
            state["student"], state["opt"], metrics = step(state["student"], state["opt"], teacher, tokens, mask,
                                                           state["index"])
            state["index"] += 1
            losses.setdefault(kind, float(metrics["loss"]))  # the first step's loss, to compare with torch

        run()  # compile and warm up
        runners[kind] = run
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(args.steps):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            start = time.perf_counter()
            runners[kind]()
            times[kind].append(time.perf_counter() - start)
    chunked = bd.DistillStep(_objective("kd", logit_chunk=args.logit_chunk), bd.make_optimizer(1e-3))
    opt_state = bd.make_optimizer(1e-3).init(eqx.filter(student, eqx.is_array))
    chunked_memory = chunked.lower(student, opt_state, teacher, tokens, mask, 0).compile().memory_analysis()
    flops = {kind: bd.step_flops(_objective(kind), teacher.config, student.config, seq_len=args.seq_len,
                                 batch=args.batch) for kind in KINDS}
    return {
        "times": times, "first_loss": losses, "flops": flops, "matmul_gflops": _matmul_gflops(),
        "temp_bytes": {kind: int(m.temp_size_in_bytes) for kind, m in memory.items()}
        | {f"kd_logit_chunk_{args.logit_chunk}": int(chunked_memory.temp_size_in_bytes)},
        "argument_bytes": {kind: int(m.argument_size_in_bytes) for kind, m in memory.items()},
        "devices": str(jax.devices()[0]), "jax": jax.__version__,
    }


class TorchKDPeer:
    """The KD step the way a PyTorch user writes it: the teacher's logits under `no_grad`,
    the student's forward, `T^2 KL(teacher || student)` over every position (T = 1),
    backward, clipping at 1.0 and AdamW (the settings of `bd.make_optimizer(1e-3)`)."""

    def __init__(self, teacher_dir: str, student_dir: str, tokens, threads: int):
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
        self.teacher = transformers.LlamaForCausalLM.from_pretrained(teacher_dir, **load).eval()
        self.teacher.requires_grad_(False)
        self.student = transformers.LlamaForCausalLM.from_pretrained(student_dir, **load).train()
        self.input_ids = torch.from_numpy(tokens)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        self.last_loss = None

    def __call__(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=self.input_ids, use_cache=False).logits
        logits = self.student(input_ids=self.input_ids, use_cache=False).logits
        log_q = torch.log_softmax(logits.float(), dim=-1)
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        loss = torch.sum(log_p.exp() * (log_p - log_q), dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.last_loss = float(loss.detach())


def torch_child(args) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from run import TorchBlockwisePeer  # noqa: E402  (the blockwise peer of the suite)

    import torch

    threads = args.threads or os.cpu_count() or 1
    tokens = _batch(_vocab(args.teacher), args.batch, args.seq_len)
    runners = {"kd": TorchKDPeer(args.teacher, args.student, tokens, threads),
               "blockwise": TorchBlockwisePeer(args.teacher, args.student, tokens, threads, level="attention")}
    losses = {}
    for kind, runner in runners.items():
        runner()  # warm up
        losses[kind] = runner.last_loss
    times: dict[str, list[float]] = {kind: [] for kind in TORCH_KINDS}
    for r in range(args.steps):
        for kind in (TORCH_KINDS if r % 2 == 0 else TORCH_KINDS[::-1]):
            start = time.perf_counter()
            runners[kind]()
            times[kind].append(time.perf_counter() - start)
    return {"times": times, "first_loss": losses, "threads": threads, "torch": torch.__version__}


def _vocab(folder: str) -> int:
    return int(json.loads((pathlib.Path(folder) / "config.json").read_text())["vocab_size"])


def _child(side: str, args, student: str) -> dict[str, Any]:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), args.teacher, "--child", side,
               "--student", student, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--logit-chunk", str(args.logit_chunk)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {side} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _student_folder(args, out: pathlib.Path) -> str:
    """The half-MLP student pruned from the teacher (the main job's), as a Hugging Face
    folder both sides load."""
    import jax.numpy as jnp

    import blockdistill as bd

    teacher = bd.load_model(args.teacher)
    calibration = jnp.asarray(_batch(teacher.config.vocab_size, 2, args.seq_len, seed=7), jnp.int32)
    student = bd.make_student(teacher, bd.StudentConfig(mlp_ratio=0.5), calibration)
    bd.to_hf(student, out)
    return str(out)


def measure(args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        student = _student_folder(args, pathlib.Path(scratch) / "student")
        runs: dict[str, list[dict[str, Any]]] = {"jax": [], "torch": []}
        for repeat in range(args.repeats):
            for side in ("jax", "torch") if repeat % 2 == 0 else ("torch", "jax"):
                if side == "torch" and args.no_torch:
                    continue
                print(f"[real] {side} child {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
                runs[side].append(_child(side, args, student))
    jax_times = {kind: [t for run in runs["jax"] for t in run["times"][kind]] for kind in KINDS}
    median = {kind: statistics.median(values) for kind, values in jax_times.items()}
    first = runs["jax"][0]
    peak = max(run["matmul_gflops"] for run in runs["jax"])
    results: dict[str, Any] = {
        "real_teacher": args.teacher, "real_batch": [args.batch, args.seq_len],
        "real_step_s": median, "real_step_s_per_child": {kind: [statistics.median(run["times"][kind])
                                                                for run in runs["jax"]] for kind in KINDS},
        "real_model_gflop": {kind: flops / 1e9 for kind, flops in first["flops"].items()},
        "real_matmul_gflops": peak,
        "real_mfu": first["flops"]["kd"] / median["kd"] / (peak * 1e9),
        "real_mfu_blockwise": first["flops"]["blockwise"] / median["blockwise"] / (peak * 1e9),
        "real_kd_vs_student_step": median["kd"] / median["student"],
        "real_temp_bytes": first["temp_bytes"], "real_argument_bytes": first["argument_bytes"],
        "real_tokens_per_s": {kind: args.batch * args.seq_len / t for kind, t in median.items()},
        "real_first_loss": {"jax": first["first_loss"]},
    }
    if runs["torch"]:
        torch_times = {kind: [t for run in runs["torch"] for t in run["times"][kind]] for kind in TORCH_KINDS}
        torch_median = {kind: statistics.median(values) for kind, values in torch_times.items()}
        results.update({
            "real_torch_step_s": torch_median,
            "real_vs_torch": torch_median["kd"] / median["kd"],
            "real_vs_torch_blockwise": torch_median["blockwise"] / median["blockwise"],
            "real_torch_threads": runs["torch"][0]["threads"],
        })
        results["real_first_loss"]["torch"] = runs["torch"][0]["first_loss"]
    return results


def table(results: dict[str, Any]) -> str:
    lines = [f"teacher {results['real_teacher']}, batch {results['real_batch'][0]} x {results['real_batch'][1]}",
             "| step | median s (jax) | median s (torch) | tokens/s (jax) | model GFLOP | compiled temp MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        torch_s = results.get("real_torch_step_s", {}).get(kind)
        lines.append(f"| {kind} | {results['real_step_s'][kind]:.3f} | "
                     f"{'' if torch_s is None else f'{torch_s:.3f}'} | {results['real_tokens_per_s'][kind]:.0f} | "
                     f"{results['real_model_gflop'][kind]:.1f} | {results['real_temp_bytes'][kind] / 2**20:.0f} |")
    for key in ("real_vs_torch", "real_vs_torch_blockwise", "real_mfu", "real_mfu_blockwise",
                "real_kd_vs_student_step", "real_matmul_gflops"):
        if key in results:
            lines.append(f"- `{key}` = {results[key]:.3f}")
    chunk = [k for k in results["real_temp_bytes"] if k.startswith("kd_logit_chunk")]
    for key in chunk:
        lines.append(f"- KD step temporaries: {results['real_temp_bytes']['kd'] / 2**20:.0f} MiB, "
                     f"{results['real_temp_bytes'][key] / 2**20:.0f} MiB with `{key[3:]}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", help="a Hugging Face Llama folder (e.g. made by experiments/get_smollm2.py)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each kind per child process")
    parser.add_argument("--repeats", type=int, default=3, help="child processes per side, alternating")
    parser.add_argument("--logit-chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = jax_child(args) if args.child == "jax" else torch_child(args)
        print(json.dumps(result))
        return result
    results = measure(args)
    print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


if __name__ == "__main__":
    main()
