"""What a searched (heterogeneous) student stores and costs, beside uniform students.

    python benchmarks/searched.py                                  # the shipped teacher
    python benchmarks/searched.py --teacher ~/.cache/blockdistill/smollm2-135m-instruct \\
        --student runs/search-smollm2/student --batch 4 --seq-len 128
    python benchmarks/searched.py --page docs/search.md --json searched.json   # write the report

The searched student is `--student` (a model folder, e.g. the `student/` that `blockdistill
search` writes); without it, a student of the block shapes that the search study chose at
50% of the shipped teacher's parameters (`experiments/search_results.json`, `search/params=0.5`)
with fresh weights (what is measured here does not depend on the weights' values). Beside
it, two uniform students of the same depth with the teacher's attention, built fresh:

- `uniform`: the MLP width that gives as many parameters of its own as the searched
  student has (the nearest whole channel);
- `widest`: every layer at the searched student's widest layer (the configuration's
  `mlp_dim` and `n_kv_heads`): what the padded form of a heterogeneous student stored and
  computed before each layer had its own shape.

For each student: its parameters (its arrays, and the bytes `to_hf` writes), analytic
forward FLOPs per token (`bd.flops_per_token`) and step FLOPs (`bd.step_flops`), the
compiled step's temporaries and arguments (`memory_analysis`), and the wall time of two
steps, timed round-robin in one process (every kind compiled first, then `--rounds` rounds
of one step of each, every other round reversed: `round_robin` of benchmarks/run.py):
`kd` (`bd.DistillStep` with `blockwise_weight=0`: the teacher's forward, the student's
forward and backward, the KL, AdamW) and `student` (labels alone: the student's own forward and backward, no teacher).
Ratios are medians over rounds of the paired ratio against `uniform`; the claim under test is
that the searched student's step costs what its own FLOPs say: `time ratio / FLOP ratio`
within 1.15 of 1.

Then the searched student goes out as `transformers` would meet it: `bd.to_hf` writes the
DeciLM / Nemotron-NAS folder, `transformers` loads it (`trust_remote_code=True`), and its
greedy continuation of a prompt is compared with `bd.generate`'s, token for token, along
with the two sides' logits on the prompt. torch is imported only after the timing (in one
process it slows JAX down). Nothing is asserted: this is a measurement script.
"""

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEARCH_RESULTS = ROOT / "experiments" / "search_results.json"
BEGIN = "<!-- searched-bench:begin (written by benchmarks/searched.py; do not edit) -->"
END = "<!-- searched-bench:end -->"
STUDENTS = ("searched", "uniform", "widest")
KINDS = ("kd", "student")
PROMPT = "def fibonacci(n):\n    "


def log(message: str) -> None:
    print(f"[searched] {message}", file=sys.stderr, flush=True)


def parse_shape(name: str):
    """A `BlockShape` from its short name (`hetero.shape_name`): `kv2 mlp384`,
    `mlp192 only`, `kv4 only`, `linear`, `identity`."""
    import blockdistill as bd

    if name == "linear":
        return bd.BlockShape(0, 0, linear=True)
    if name == "identity":
        return bd.BlockShape(0, 0)
    kv = mlp = 0
    for part in name.replace(" only", "").split():
        if part.startswith("kv"):
            kv = int(part[2:])
        elif part.startswith("mlp"):
            mlp = int(part[3:])
        else:
            raise ValueError(f"cannot read the block shape {name!r}")
    return bd.BlockShape(mlp_dim=mlp, n_kv_heads=kv)


def recorded_shapes(key: str = "search/params=0.5") -> tuple:
    """The kept layers' shapes of a search recorded in `experiments/search_results.json`."""
    record = json.loads(SEARCH_RESULTS.read_text())[key]
    shapes = tuple(parse_shape(name) for name in record["chosen"])
    return tuple(s for s in shapes if s.has_attention or s.has_mlp or s.linear)


def hetero_config(teacher_config, shapes):
    """The teacher's config with these layers (the config's widths the widest layer's)."""
    if len(set(shapes)) == 1 and shapes[0].has_attention and shapes[0].has_mlp:
        return teacher_config.replace(n_layers=len(shapes), mlp_dim=shapes[0].mlp_dim,
                                      n_kv_heads=shapes[0].n_kv_heads, layer_shapes=None)
    return teacher_config.replace(
        n_layers=len(shapes), mlp_dim=max(1, max(s.mlp_dim for s in shapes)),
        n_kv_heads=max(1, max(s.n_kv_heads for s in shapes)), layer_shapes=tuple(shapes),
    )


def same_parameters(teacher_config, searched_config):
    """The uniform config of the searched student's depth, with the teacher's attention and
    the MLP width whose parameter count is nearest the searched student's."""
    import blockdistill as bd

    target = bd.parameter_count(searched_config)
    base = teacher_config.replace(n_layers=searched_config.n_layers, layer_shapes=None)
    per_channel = 3 * base.dim * base.n_layers
    without_mlp = bd.parameter_count(base.replace(mlp_dim=1)) - per_channel
    width = max(1, round((target - without_mlp) / per_channel))
    return base.replace(mlp_dim=width)


def objective(kind: str):
    import blockdistill as bd

    if kind == "kd":
        return bd.DistillationObjective(blockwise_weight=0.0)
    return bd.DistillationObjective(blockwise_weight=0.0, teacher_weight=0.0, label_weight=1.0)


def measure(args) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import blockdistill as bd
    from blockdistill.nn.hetero import describe_shapes

    teacher_model = bd.load_model(args.teacher)
    teacher = bd.Teacher(teacher_model)
    t_cfg = teacher_model.config
    if args.student:
        searched = bd.load_model(args.student)
        source = str(args.student)
    else:
        searched = bd.Transformer(hetero_config(t_cfg, recorded_shapes()), key=jax.random.key(1))
        source = f"{SEARCH_RESULTS.relative_to(ROOT)}: search/params=0.5 (fresh weights)"
    s_cfg = searched.config
    uniform_cfg = same_parameters(t_cfg, s_cfg)
    widest_cfg = s_cfg.replace(layer_shapes=None)
    models = {
        "searched": searched,
        "uniform": bd.Transformer(uniform_cfg, key=jax.random.key(2)),
        "widest": bd.Transformer(widest_cfg, key=jax.random.key(3)),
    }
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, t_cfg.vocab_size, (args.batch, args.seq_len)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    log(f"teacher {args.teacher}: {t_cfg.n_layers} layers; searched student {source}: "
        f"{describe_shapes(s_cfg) if s_cfg.layer_shapes else 'uniform'}")

    students: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in models.items():
            arrays = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
            folder = bd.to_hf(model, pathlib.Path(scratch) / name)
            record = {
                "layers": describe_shapes(model.config) if model.config.layer_shapes else
                f"{model.config.n_layers} x kv{model.config.n_kv_heads} mlp{model.config.mlp_dim}",
                "params": bd.parameter_count(model.config), "param_arrays": int(arrays),
                "safetensors_bytes": (folder / "model.safetensors").stat().st_size,
                "flops_per_token": bd.flops_per_token(model.config, seq_len=args.seq_len),
                "kv_bytes_per_token": bd.kv_cache_bytes_per_token(model.config),
                "step_flops": {}, "temp_bytes": {}, "argument_bytes": {},
            }
            for kind in KINDS:
                optimizer = bd.make_optimizer(1e-3)
                own = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
                state = {"student": own, "opt": optimizer.init(eqx.filter(own, eqx.is_array)), "index": 0}
                step = bd.DistillStep(objective(kind), optimizer)
                log(f"compiling {name}/{kind}")
                memory = step.lower(own, state["opt"], teacher, tokens, mask, 0).compile().memory_analysis()
                record["temp_bytes"][kind] = int(memory.temp_size_in_bytes)
                record["argument_bytes"][kind] = int(memory.argument_size_in_bytes)
                record["step_flops"][kind] = bd.step_flops(objective(kind), t_cfg, model.config,
                                                           seq_len=args.seq_len, batch=args.batch)

                def run(step=step, state=state):
                    state["student"], state["opt"], metrics = step(state["student"], state["opt"], teacher,
                                                                   tokens, mask, state["index"])
                    state["index"] += 1
                    metrics["loss"].block_until_ready()

                run()  # compile and warm up
                runners[f"{name}/{kind}"] = run
            students[name] = record
    log(f"timing {len(runners)} steps round-robin, {args.rounds} rounds")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from run import round_robin  # the suite's timing protocol (benchmarks/run.py)

    times, _ = round_robin(runners, args.rounds)
    for name in STUDENTS:
        students[name]["step_s"] = {kind: statistics.median(times[f"{name}/{kind}"]) for kind in KINDS}
        students[name]["step_s_samples"] = {kind: times[f"{name}/{kind}"] for kind in KINDS}
    ratios: dict[str, Any] = {}
    for name in ("searched", "widest"):
        for kind in KINDS:
            paired = [a / b for a, b in zip(times[f"{name}/{kind}"], times[f"uniform/{kind}"])]
            time_ratio = statistics.median(paired)
            flop_ratio = students[name]["step_flops"][kind] / students["uniform"]["step_flops"][kind]
            ratios[f"{name}/{kind}"] = {
                "time": time_ratio, "flops": flop_ratio, "time_over_flops": time_ratio / flop_ratio,
                "temp": students[name]["temp_bytes"][kind] / students["uniform"]["temp_bytes"][kind],
            }
        ratios[f"{name}/params"] = students[name]["params"] / students["uniform"]["params"]
    padded_layers, _ = bd.padded_layers(searched)
    outer = students["searched"]["params"] - sum(
        x.size for x in jax.tree.leaves(eqx.filter(searched.layers, eqx.is_array)))
    results = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
        "teacher": str(args.teacher), "teacher_params": bd.parameter_count(t_cfg),
        "searched_source": source, "batch": [args.batch, args.seq_len], "rounds": args.rounds,
        "devices": str(jax.devices()[0]), "jax": jax.__version__,
        "padded_params": int(outer + sum(x.size for x in jax.tree.leaves(padded_layers))),
        "students": students, "ratios": ratios,
    }
    results["export"] = export_check(searched, args)
    return results


def export_check(searched, args) -> dict[str, Any]:
    """`bd.to_hf` the searched student, load it with `transformers`, and compare greedy
    continuations and prompt logits with blockdistill's."""
    import jax.numpy as jnp
    import numpy as np

    import blockdistill as bd

    try:
        tokenizer = bd.load_tokenizer(args.teacher)
        prompt = [int(t) for t in tokenizer.encode(PROMPT)]
    except (FileNotFoundError, ValueError):
        tokenizer, prompt = None, [int(t) for t in np.random.default_rng(5).integers(0, searched.config.vocab_size, 8)]
    ours = bd.generate(searched, jnp.asarray(prompt, jnp.int32), args.new_tokens)
    ours_ids = [int(t) for t in np.asarray(ours.tokens).reshape(-1)]
    ours_logits = np.asarray(searched(jnp.asarray(prompt, jnp.int32)).logits)
    log("exporting and loading with transformers")
    import torch  # after the timing
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        folder = bd.to_hf(searched, pathlib.Path(scratch) / "student")
        config = json.loads((folder / "config.json").read_text())
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.as_tensor(prompt, dtype=torch.long)[None]
        with torch.no_grad():
            theirs = hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            their_logits = hf(ids).logits[0].numpy()
        theirs_ids = theirs[0, len(prompt):].tolist()
        error = float(np.max(np.abs(ours_logits - their_logits)) / np.max(np.abs(their_logits)))
        return {
            "architecture": config["architectures"][0], "class": type(hf).__name__,
            "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "same_greedy_continuation": ours_ids == theirs_ids, "ours": ours_ids, "transformers": theirs_ids,
            "text": tokenizer.decode(np.asarray(ours_ids)) if tokenizer is not None else None,
            "logits_relative_error": error,
        }


def table(results: dict[str, Any]) -> str:
    s, r = results["students"], results["ratios"]
    batch, seq = results["batch"]
    lines = [
        (f"Teacher `{pathlib.Path(results['teacher']).name}` ({results['teacher_params']:,} parameters); "
         f"searched student: {results['searched_source']}; batch {batch} x {seq}, {results['rounds']} rounds "
         f"round-robin, {results['devices']}, {results['date']}."),
        "",
        ("| student | layers | own parameters | safetensors MiB | forward MFLOP / token | KD step s | "
         "student step s | KD temp MiB | student temp MiB |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in STUDENTS:
        x = s[name]
        lines.append(
            f"| {name} | {x['layers'].replace(' | ', '; ')} | {x['params']:,} | {x['safetensors_bytes'] / 2**20:.2f} | "
            f"{x['flops_per_token'] / 1e6:.2f} | {x['step_s']['kd']:.4f} | {x['step_s']['student']:.4f} | "
            f"{x['temp_bytes']['kd'] / 2**20:.1f} | {x['temp_bytes']['student'] / 2**20:.1f} |")
    lines += ["", "| against `uniform` | parameters | step | FLOP ratio | time ratio | time / FLOPs | temp ratio |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for name in ("searched", "widest"):
        for kind in KINDS:
            x = r[f"{name}/{kind}"]
            lines.append(f"| {name} | {r[f'{name}/params']:.3f} | {kind} | {x['flops']:.3f} | {x['time']:.3f} | "
                         f"{x['time_over_flops']:.3f} | {x['temp']:.3f} |")
    e = results["export"]
    lines += ["", (f"The searched student's padded form would store {results['padded_params']:,} parameters "
                   f"({results['padded_params'] / s['searched']['params']:.2f}x its own). Exported by `bd.to_hf` "
                   f"as `{e['architecture']}`, loaded by `transformers` as `{e['class']}`: prompt logits within "
                   f"{e['logits_relative_error']:.1e} (relative), greedy continuation of {e['new_tokens']} tokens "
                   f"{'identical' if e['same_greedy_continuation'] else 'DIFFERENT'} "
                   f"({e['ours'][:12]}{' ...' if len(e['ours']) > 12 else ''}).")]
    return "\n".join(lines)


def write_page(page: pathlib.Path, section: str, text: str) -> None:
    """Replace the section `section` (a `### ` heading) between the markers of `page`."""
    content = page.read_text()
    if BEGIN not in content:
        raise SystemExit(f"{page} has no {BEGIN!r} marker")
    head, rest = content.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    parts: dict[str, str] = {}
    current = None
    for line in body.strip("\n").splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            parts[current] = ""
        elif current is not None:
            parts[current] += line + "\n"
    parts[section] = "\n" + text + "\n\n"
    new = "".join(f"### {title}\n{value}" for title, value in parts.items())
    page.write_text(f"{head}{BEGIN}\n{new.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="shipped", help="a model folder or `shipped` (default)")
    parser.add_argument("--student", help="the searched student's folder (default: the recorded 50%% search's shapes)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--page", type=pathlib.Path, help="write the table into this page's searched-bench section")
    parser.add_argument("--section", default=None, help="the section's title (default: the teacher's name)")
    args = parser.parse_args(argv)
    results = measure(args)
    text = table(results)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.page:
        section = args.section or f"{pathlib.Path(results['teacher']).name} teacher"
        write_page(args.page, section, text + f"\n\nReproduce: `{results['command']}`")
    return results


if __name__ == "__main__":
    main()
