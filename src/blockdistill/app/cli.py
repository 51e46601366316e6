"""The `blockdistill` command: `pretrain`, `distill`, `cache-teacher`, `search`, `plan`, `eval`, `generate`,
`export-hf`.

Every option is a field of a TOML config (`--config FILE`); flags override the file.
Errors are one line naming the culprit, with a non-zero exit status.
"""

import argparse
import os
import pathlib
import sys

from .modelconfig import EvalConfig, GenerateConfig
from .options import add_flags, build_config, given_flags
from .runconfig import CacheConfig, DistillConfig, PretrainConfig
from .search import SearchConfig

_DESCRIPTION = """Blockwise parallel distillation of decoder-only transformers.

  blockdistill distill --out runs/demo        distill the shipped teacher (the main job)
  blockdistill pretrain --out runs/teacher    train a teacher from scratch
  blockdistill cache-teacher --out CACHE      run the teacher once, keep its top-k logits
  blockdistill search --budget params=0.5     train candidate blocks per layer, assemble the best student
  blockdistill plan --teacher CONFIG.json     per-device memory of a run, before any weight is read
  blockdistill eval MODEL                     held-out loss of a model folder
  blockdistill generate MODEL --prompt TEXT   continue a text with a model (greedy or sampled)
  blockdistill export-hf RUN_OR_MODEL OUT     write a folder transformers can load
"""


#: what `distill --help` says about its default recipe, and why (docs/quality.md, docs/real.md)
_DISTILL_RECIPE = """\
default recipe: logit KD plus 0.5 label cross-entropy (--blockwise-weight 0; --label-weight
defaults to 0.5 beside KD) into the default student, pruned to half the teacher's MLP width.
On a real checkpoint (SmolLM2-135M, docs/real.md; equal measured seconds, three seeds) KD +
0.5 CE closed 74.7% of the gap for that student against KD alone's 65.3%; on the shipped
teacher the two tie (docs/quality.md). For that student blockwise training alone stops
short of KD on both teachers. For a student with fewer KV heads (--kv-heads-ratio) use
layer-level blockwise (--blockwise-weight 1 --blockwise-schedule constant, which runs
without labels): with one KV head of SmolLM2's three it closed 82% of the gap against
KD's 69% (blockwise: three seeds) and reached KD's final loss in 0.26x its seconds; at
three times the budget it reached 90% of the gap in 0.62x of the seconds in which KD did
not (one seed; 0.64x on the shipped teacher). Use --learning-rate 3e-4 for KD on teachers
of that size."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockdistill", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, cls, text in (
        ("distill", DistillConfig, "distill a teacher into a student (the main job)"),
        ("pretrain", PretrainConfig, "train a model from scratch with next-token cross-entropy"),
    ):
        sub = commands.add_parser(name, help=text, description=text,
                                  epilog=_DISTILL_RECIPE if name == "distill" else None,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
        add_flags(sub, cls)
    text = "run the teacher once over the corpus and store its top-k logits (distill --teacher-cache reads them)"
    sub = commands.add_parser("cache-teacher", help=text, description=text)
    sub.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    add_flags(sub, CacheConfig)
    text = ("train many candidate blocks for every teacher layer at once, score them and assemble the best "
            "student under a budget (finish it with distill --student)")
    sub = commands.add_parser("search", help=text, description=text)
    sub.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    add_flags(sub, SearchConfig)
    text = ("per-device memory of a distillation run, from its step compiled on abstract shapes: only the "
            "teacher's config.json is read")
    sub = commands.add_parser("plan", help=text, description=text)
    sub.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    sub.add_argument("--device-memory", metavar="BYTES", help="memory of one device, e.g. 80GB: says whether it fits")
    add_flags(sub, DistillConfig)
    sub = commands.add_parser("eval", help="held-out loss of a model folder")
    sub.add_argument("model", nargs="?", help="model folder (blockdistill or Hugging Face), default: shipped")
    sub.add_argument("--config", metavar="FILE")
    add_flags(sub, EvalConfig, skip=("model",))
    text = "continue texts with a model, with a KV cache (greedy by default; sampled with --temperature)"
    sub = commands.add_parser("generate", help=text, description=text)
    sub.add_argument("model", nargs="?", help="a model folder (blockdistill or Hugging Face), a run folder (its "
                     "final student), or `shipped` (the default)")
    sub.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    add_flags(sub, GenerateConfig, skip=("model",))
    sub = commands.add_parser("export-hf", help="export a student to a Hugging Face folder")
    sub.add_argument("source", help="a run folder (its final student, else its newest checkpoint), "
                     "a checkpoint folder or a model folder")
    sub.add_argument("out", help="the folder to write (config.json + model.safetensors)")
    sub.add_argument("--architecture", default=None, help="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM "
                     "or DeciLMForCausalLM (the default for a heterogeneous student: NVIDIA Puzzle's format)")
    sub.add_argument("--tokenizer", default=None, metavar="FOLDER",
                     help="the tokenizer to export with (default: the one the source recorded)")
    return parser


def _final_model(source: pathlib.Path) -> pathlib.Path | None:
    """The final model folder of a run folder (`student/`, or a pretraining run's
    `model/`), if it has one."""
    for name in ("student", "model"):
        if (source / name / "config.json").is_file():
            return source / name
    return None


def _export(args) -> None:
    import json

    from ..data.tokenizers import load_tokenizer, tokenizer_record
    from ..interop.folders import load_model
    from ..interop.hf import to_hf
    from ..nn.config import TransformerConfig
    from .checkpoint import (
        is_checkpoint,
        list_checkpoints,
        load_checkpoint_model,
        read_state,
    )

    source = pathlib.Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    final = _final_model(source)
    checkpoint = None
    if is_checkpoint(source):
        checkpoint = source
    elif list_checkpoints(source):
        checkpoint = list_checkpoints(source)[-1]
        if not {"student_config", "model_config"} & read_state(checkpoint).keys():
            checkpoint = None  # not a model's checkpoint (e.g. a search's block library)
    if final is not None and checkpoint is not None and not is_checkpoint(source):
        saved_step = json.loads((final / "config.json").read_text()).get("step")
        if saved_step is not None and int(checkpoint.name) > saved_step:
            # e.g. an --extend that was interrupted: its checkpoints are newer than the student
            print(f"exporting checkpoint {checkpoint} (step {checkpoint.name}): it is newer than {final} "
                  f"(step {saved_step}), which an unfinished continuation of the run has not replaced yet")
            final = None
        elif saved_step is None:
            print(f"note: {final} does not record its step; {source} also holds checkpoints up to step "
                  f"{checkpoint.name} (export {checkpoint} to take that one)")
    if final is not None:  # a finished run
        model_dir = final
        model = load_model(model_dir)
        tokenizer_dir = model_dir
    else:
        if checkpoint is not None:
            import equinox as eqx
            import jax

            from ..nn.model import Transformer

            state = read_state(checkpoint)
            config = TransformerConfig.from_dict(state["student_config"] if "student_config" in state
                                                 else state["model_config"])
            like = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
            model = load_checkpoint_model(checkpoint, like)
            tokenizer_dir = checkpoint.parent.parent / "tokenizer"  # the run's
            if not tokenizer_dir.is_dir():
                raise FileNotFoundError(
                    f"{checkpoint.parent.parent} has no tokenizer/ folder (a run started "
                    "before tokenizers were recorded): export its student folder instead"
                )
        else:
            model = load_model(source)
            tokenizer_dir = source
    tokenizer = load_tokenizer(tokenizer_dir, args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer of {tokenizer_dir} has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {model.config.vocab_size}"
        )
    tokenizer_from = None
    if tokenizer_record(tokenizer)["kind"] == "hf":
        tokenizer_from = tokenizer.folder
    path = to_hf(model, args.out, architecture=args.architecture, tokenizer_from=tokenizer_from)
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    remote = " (transformers: trust_remote_code=True)" if architecture == "DeciLMForCausalLM" else ""
    print(f"wrote {path}: {architecture}{remote}, {model.config.n_layers} layers, dim {model.config.dim}; tokenizer: "
          f"{'copied from ' + str(tokenizer_from) if tokenizer_from else 'byte-level, no files'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export-hf":
            _export(args)
            return 0
        from .commands import cache_teacher, evaluate_command, generate_command, plan_command, pretrain
        from .distill import distill

        model_commands = {"generate": (GenerateConfig, generate_command), "eval": (EvalConfig, evaluate_command)}
        if args.command in model_commands:  # a saved model as the positional argument
            config_class, command = model_commands[args.command]
            overrides = given_flags(args, config_class)
            if args.model is not None:
                overrides["model"] = args.model
            command(build_config(config_class, args.config, overrides))
            return 0
        if args.command == "plan":
            cfg = build_config(DistillConfig, args.config, given_flags(args, DistillConfig))
            plan_command(cfg, args.device_memory, argv if argv is not None else sys.argv[1:])
            return 0
        if args.command == "search":
            from .search import search

            search(build_config(SearchConfig, args.config, given_flags(args, SearchConfig)))
            return 0
        if args.command == "cache-teacher":
            cache_teacher(build_config(CacheConfig, args.config, given_flags(args, CacheConfig)))
            return 0
        cls = DistillConfig if args.command == "distill" else PretrainConfig
        cfg = build_config(cls, args.config, given_flags(args, cls))
        (distill if args.command == "distill" else pretrain)(cfg)
        return 0
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        print(f"blockdistill: {message}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as error:
        if os.environ.get("BLOCKDISTILL_TRACEBACK"):
            raise
        print(f"blockdistill: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
