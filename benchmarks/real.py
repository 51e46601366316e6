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
`logit_chunk`. With `--breakdown` both sides also time the KD step's parts apart (the
teacher's forward; the student's forward and backward of the KL given the teacher's
logits; of that, the final norm, output head and KL alone given the hidden states; the
clipped AdamW update), each as its own program, to say where a step's time goes. No
assertion is made: this is a measurement script.
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

    teacher = bd.Teacher(bd.load_model(args.teacher, scan_layers=not args.unrolled))
    student = bd.load_model(args.student, scan_layers=not args.unrolled)
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
    parts = _jax_parts(teacher, student, tokens, mask, args.steps) if args.breakdown else None
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
        "devices": str(jax.devices()[0]), "jax": jax.__version__, "parts": parts,
    }


#: the parts of the KD step timed apart with --breakdown (each side the same work)
PARTS = ("teacher_forward", "student_forward_backward", "head_kl_backward", "optimizer_update")
PART_LABELS = {
    "teacher_forward": "teacher forward (logits)",
    "student_forward_backward": "student forward + backward of the KL (teacher logits given)",
    "head_kl_backward": "of which: final norm + output head + KL, forward and backward (hidden given)",
    "optimizer_update": "clip + AdamW update of the student",
}


def _timed(runners: dict[str, Any], steps: int) -> dict[str, list[float]]:
    """Each runner once to compile and warm up, then `steps` rounds of one call each: the
    suite's `round_robin` (benchmarks/run.py), its wall times."""
    sys.path.insert(0, str(HERE))
    from run import round_robin  # the suite's timing protocol

    for run in runners.values():
        run()
    return round_robin(runners, steps)[0]


def _jax_parts(teacher, student, tokens, mask, steps: int) -> dict[str, list[float]]:
    """The KD step's parts, each its own jitted program, timed side by side."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import blockdistill as bd

    model = teacher.model
    teacher_logits = eqx.filter_jit(lambda m, t: jax.vmap(lambda x: m(x).logits)(t))
    logits = teacher_logits(model, tokens)

    @eqx.filter_jit
    def student_grads(s, t, target):
        return eqx.filter_value_and_grad(lambda s: bd.logit_divergence(jax.vmap(lambda x: s(x).logits)(t), target, mask))(s)

    head_module = student.embed_tokens if student.lm_head is None else student.lm_head
    hidden = jax.vmap(lambda x: student(x).hidden)(tokens)
    split = jax.tree.map(lambda _: False, student)
    split = eqx.tree_at(lambda m: (m.norm, m.embed_tokens if m.lm_head is None else m.lm_head), split,
                        replace=(jax.tree.map(eqx.is_array, student.norm), jax.tree.map(eqx.is_array, head_module)))
    head_params, rest = eqx.partition(student, split)

    @eqx.filter_jit
    def head_grads(params, h, target):
        def loss(params, h):
            return bd.logit_divergence(jax.vmap(eqx.combine(params, rest).head)(h), target, mask)

        return jax.value_and_grad(loss, argnums=(0, 1))(params, h)

    optimizer = bd.make_optimizer(1e-3)
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), eqx.filter(student, eqx.is_array))
    grads = jax.tree.map(jnp.ones_like, params)
    # in place, as the step does it (and torch): the parameters and moments are donated
    held = {"params": params, "opt": optimizer.init(params)}

    @eqx.filter_jit(donate="all-except-first")
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    def run_update():
        held["params"], held["opt"] = update(grads, held["opt"], held["params"])
        jax.block_until_ready(held["params"])

    runners = {
        "teacher_forward": lambda: jax.block_until_ready(teacher_logits(model, tokens)),
        "student_forward_backward": lambda: jax.block_until_ready(student_grads(student, tokens, logits)),
        "head_kl_backward": lambda: jax.block_until_ready(head_grads(head_params, hidden, logits)),
        "optimizer_update": run_update,
    }
    return _timed(runners, steps)


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


def _torch_parts(peer: "TorchKDPeer", steps: int) -> dict[str, list[float]]:
    """The KD step's parts as the PyTorch peer runs them, timed side by side."""
    torch = peer.torch
    with torch.no_grad():
        teacher_logits = peer.teacher(input_ids=peer.input_ids, use_cache=False).logits
        hidden = peer.student.model(input_ids=peer.input_ids, use_cache=False).last_hidden_state
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)

    def kl(logits):
        log_q = torch.log_softmax(logits.float(), dim=-1)
        return torch.sum(log_p.exp() * (log_p - log_q), dim=-1).mean()

    def teacher_forward():
        with torch.no_grad():
            peer.teacher(input_ids=peer.input_ids, use_cache=False)

    def student_forward_backward():
        peer.optimizer.zero_grad(set_to_none=True)
        kl(peer.student(input_ids=peer.input_ids, use_cache=False).logits).backward()

    def head_kl_backward():
        peer.optimizer.zero_grad(set_to_none=True)
        h = hidden.detach().requires_grad_(True)
        kl(peer.student.lm_head(peer.student.model.norm(h))).backward()

    def optimizer_update():
        for p in peer.params:
            p.grad = torch.ones_like(p) if p.grad is None else p.grad
        torch.nn.utils.clip_grad_norm_(peer.params, 1.0)
        peer.optimizer.step()

    student_forward_backward()  # gradients exist for the update
    runners = {"teacher_forward": teacher_forward, "student_forward_backward": student_forward_backward,
               "head_kl_backward": head_kl_backward}
    times = _timed(runners, steps)
    student_forward_backward()
    times.update(_timed({"optimizer_update": optimizer_update}, steps))
    return times


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
    parts = _torch_parts(runners["kd"], args.steps) if args.breakdown else None
    return {"times": times, "first_loss": losses, "threads": threads, "torch": torch.__version__, "parts": parts}


def _vocab(folder: str) -> int:
    return int(json.loads((pathlib.Path(folder) / "config.json").read_text())["vocab_size"])


def _child(side: str, args, student: str) -> dict[str, Any]:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), args.teacher, "--child", side,
               "--student", student, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--logit-chunk", str(args.logit_chunk)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += [flag for flag, on in (("--breakdown", args.breakdown), ("--unrolled", args.unrolled)) if on]
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
        "real_teacher": args.teacher, "real_batch": [args.batch, args.seq_len], "real_scan_layers": not args.unrolled,
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
    if args.breakdown:
        results["real_parts_s"] = {side: {part: statistics.median([t for run in runs[side] for t in run["parts"][part]])
                                          for part in PARTS} for side in runs if runs[side]}
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
    parts = results.get("real_parts_s")
    if parts:
        lines += ["", "| part of the KD step | median s (jax) | median s (torch) | torch / jax |", "|---|---:|---:|---:|"]
        for part in PARTS:
            ours, theirs = parts["jax"][part], parts.get("torch", {}).get(part)
            ratio = "" if theirs is None else f"{theirs / ours:.2f}"
            lines.append(f"| {PART_LABELS[part]} | {ours:.3f} | {'' if theirs is None else f'{theirs:.3f}'} | {ratio} |")
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
    parser.add_argument("--unrolled", action="store_true",
                        help="the JAX side runs its layers as an unrolled loop (scan_layers=False) instead of one scan")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the KD step's parts apart on both sides (teacher forward, student "
                             "forward + backward, the output head and KL, the optimizer update)")
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
