"""The block library search: candidates, their joint training, scores and the assembly."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdistill as bd
from helpers import REPO_ROOT

CONFIG = bd.TransformerConfig(
    vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32,
    attention_impl="xla",
)
SPACE = bd.SearchSpace(mlp_ratios=(1.0, 0.5))


@pytest.fixture(scope="module")
def setup():
    model = bd.Transformer(CONFIG, key=jax.random.key(0))
    # a teacher whose layers do real work: scaled-up weights give non-trivial blocks
    model = jax.tree.map(lambda x: x * 4 if eqx.is_inexact_array(x) and x.ndim == 3 else x, model)
    teacher = bd.Teacher(model)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    library = bd.init_library(teacher, SPACE, tokens)
    return teacher, tokens, mask, library


def _index(library, shape):
    return library.shapes.index(shape)


def test_candidates_cover_the_space():
    shapes = bd.candidate_shapes(CONFIG, SPACE)
    names = [(s.mlp_dim, s.n_kv_heads, s.linear) for s in shapes]
    assert names == [
        (48, 2, False), (24, 2, False), (48, 1, False), (24, 1, False),  # kv x mlp
        (48, 0, False), (24, 0, False),  # no attention
        (0, 2, False), (0, 1, False),  # no MLP
        (0, 0, True), (0, 0, False),  # linear, identity
    ]
    # ratios that round to one width appear once; default KV heads n, n/2, 1
    wide = CONFIG.replace(n_kv_heads=4, n_heads=8, dim=64)
    shapes = bd.candidate_shapes(wide, bd.SearchSpace(mlp_ratios=(0.5, 0.501), drop_attention=False, drop_mlp=False,
                                                      linear=False, identity=False))
    assert [(s.mlp_dim, s.n_kv_heads) for s in shapes] == [(24, 4), (24, 2), (24, 1)]
    with pytest.raises(ValueError, match=r"SearchSpace.kv_heads=\(3,\).*n_heads=4"):
        bd.candidate_shapes(CONFIG, bd.SearchSpace(kv_heads=(3,)))
    with pytest.raises(ValueError, match=r"SearchSpace.mlp_ratios=\(1.5,\)"):
        bd.SearchSpace(mlp_ratios=(1.5,))
    with pytest.raises(ValueError, match="SearchSpace has no field"):
        bd.SearchSpace.from_dict({"mlp_ratio": [0.5]})
    assert bd.SearchSpace.from_dict(SPACE.to_dict()) == SPACE


def test_initial_candidates_are_the_pruned_teacher(setup):
    teacher, tokens, mask, library = setup
    scores = np.asarray(bd.blockwise_scores(library, teacher, tokens, mask))
    # the teacher's own shape is its layers: zero loss at every layer
    np.testing.assert_allclose(scores[_index(library, bd.BlockShape(48, 2))], 0.0, atol=1e-6)
    # the linear map starts at zero: it is the identity
    np.testing.assert_allclose(scores[_index(library, bd.BlockShape(0, 0, linear=True))],
                               scores[_index(library, bd.BlockShape(0, 0))], rtol=1e-6)
    # a pruned candidate is make_student's pruning of the same layers
    student = bd.make_student(teacher, bd.StudentConfig(mlp_ratio=0.5, kv_heads_ratio=0.5), tokens)
    stack = library.stack_of(_index(library, bd.BlockShape(24, 1)))
    for a, b in zip(jax.tree.leaves(stack.layers), jax.tree.leaves(student.layers.layers), strict=True):
        np.testing.assert_array_equal(a, b)
    # fewer channels or heads lose more: the ordering a search relies on
    full, half_mlp, drop_mlp = (scores[_index(library, s)] for s in (bd.BlockShape(48, 2), bd.BlockShape(24, 2), bd.BlockShape(0, 2)))
    assert np.all(full < half_mlp) and np.all(half_mlp < drop_mlp)


def test_the_library_shares_no_buffer_with_its_teacher(setup):
    """The library step donates the library's buffers: none of them may be the teacher's
    (a linear candidate's input norm starts as the teacher's, as a copy)."""
    teacher, _, _, library = setup
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))}  # noqa: E731
    assert not pointers(library) & pointers(teacher)
    linear = library.stack_of(_index(library, bd.BlockShape(0, 0, linear=True)))
    np.testing.assert_array_equal(linear.segments[0].input_layernorm.weight,
                                  teacher.model.layers.layers.input_layernorm.weight)


def test_library_training_keeps_blocks_independent(setup):
    """Training the whole library moves each candidate exactly as training it alone would
    (its gradient is its own loss's), lowers the pruned candidates' losses, and leaves the
    teacher's own candidate exact."""
    teacher, tokens, mask, library = setup
    copy = lambda tree: jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)  # noqa: E731

    def train(library, steps=4):
        optimizer = bd.make_optimizer(1e-3, clip_norm=None)
        opt_state = optimizer.init(eqx.filter(library, eqx.is_inexact_array))
        step = bd.LibraryStep(optimizer=optimizer)
        history = []
        for _ in range(steps):
            library, opt_state, losses = step(library, opt_state, teacher, tokens, mask)
            history.append(np.asarray(losses))
        return library, history

    trained, history = train(copy(library))
    target = bd.BlockShape(24, 1)
    alone = bd.BlockLibrary(
        stacks=(copy(library.stack_of(_index(library, target))),), shapes=(target,), config=library.config
    )
    alone, alone_history = train(alone)
    row = library.trained_shapes.index(target)
    np.testing.assert_allclose(alone_history[-1][0], history[-1][row], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(alone.stacks[0]), jax.tree.leaves(trained.stack_of(_index(library, target)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    own = library.trained_shapes.index(bd.BlockShape(48, 2))
    for a, b in zip(jax.tree.leaves(trained.stacks[own]), jax.tree.leaves(library.stacks[own])):
        np.testing.assert_array_equal(a, b)
    pruned = [i for i, s in enumerate(library.trained_shapes) if i != own]
    assert np.all(history[-1][pruned].sum(axis=1) < history[0][pruned].sum(axis=1))


def _skip_layer_kl(teacher, tokens, mask, layer):
    """KL(teacher || teacher without layer `layer`), computed directly."""
    model = teacher.model
    params, static = eqx.partition(model.layers.layers, eqx.is_array)

    def forward(t):
        hidden = model.embed(t)
        for index in range(model.config.n_layers):
            if index != layer:
                hidden = eqx.combine(jax.tree.map(lambda p: p[index], params), static)(hidden).layer_out
        return model.head(hidden)

    logits = jax.vmap(forward)(tokens)
    return bd.kl_divergence(logits, jax.vmap(model)(tokens).logits, mask)


def test_swap_scores_are_the_kl_of_one_swapped_block(setup):
    teacher, tokens, mask, library = setup
    scores = bd.replacement_scores(library, teacher, tokens, mask)
    kl = np.asarray(bd.swap_scores(library, teacher, tokens, mask))
    np.testing.assert_array_equal(kl, scores["kl"])
    assert kl.shape == (len(library.shapes), CONFIG.n_layers)
    np.testing.assert_allclose(kl[_index(library, bd.BlockShape(48, 2))], 0.0, atol=1e-6)
    identity = _index(library, bd.BlockShape(0, 0))
    for layer in range(CONFIG.n_layers):
        np.testing.assert_allclose(kl[identity, layer], _skip_layer_kl(teacher, tokens, mask, layer), rtol=1e-4)
    # a swapped block of another shape: the student assembled from it alone gives the same KL
    half = _index(library, bd.BlockShape(24, 1))
    own = _index(library, bd.BlockShape(48, 2))
    student = bd.assemble_student(teacher, library, [own, half, own])
    logits = jax.vmap(student)(tokens).logits
    teacher_logits = jax.vmap(teacher.model)(tokens).logits
    expected = bd.kl_divergence(logits, teacher_logits, mask)
    np.testing.assert_allclose(kl[half, 1], expected, rtol=1e-4)
    # the other two scores of the same swap: its LM loss and how often its top-1 differs
    np.testing.assert_allclose(scores["lm_loss"][half, 1], bd.next_token_cross_entropy(logits, tokens, mask), rtol=1e-4)
    differs = np.asarray(jnp.argmax(logits, -1) != jnp.argmax(teacher_logits, -1))
    np.testing.assert_allclose(scores["top1"][half, 1], differs[np.asarray(mask)].mean(), atol=1e-6)
    assert np.all(np.asarray(scores["top1"][own]) == 0.0)  # the teacher's own block changes nothing


def test_assembled_student_runs_the_chosen_blocks(setup, tmp_path):
    teacher, tokens, mask, library = setup
    chosen = [_index(library, s) for s in (bd.BlockShape(24, 0), bd.BlockShape(0, 0), bd.BlockShape(0, 0, linear=True))]
    student = bd.assemble_student(teacher, library, chosen)
    assert student.config.n_layers == 2  # the identity layer is gone
    assert student.config.layer_shapes == (bd.BlockShape(24, 0), bd.BlockShape(0, 0, linear=True))
    # each student layer on the teacher's input to its layer gives the candidate's output
    states = jax.vmap(teacher)(tokens).states
    inject = states.layer_in[:, jnp.array([0, 2])]
    got = jax.vmap(lambda t, x: student.blockwise_outputs(t, x, inject_at="layer"))(tokens, inject)
    for j, (layer, candidate) in enumerate(((0, chosen[0]), (2, chosen[2]))):
        stack = library.stack_of(candidate)
        want = jax.vmap(lambda x: stack.blockwise_outputs(x, inject_at="layer"))(states.layer_in)[:, layer]
        np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=1e-5)
    # the teacher's shape everywhere is the teacher, a plain uniform model
    same = bd.assemble_student(teacher, library, [_index(library, bd.BlockShape(48, 2))] * 3)
    assert same.config.layer_shapes is None
    np.testing.assert_allclose(same(tokens[0]).logits, teacher(tokens[0]).logits, atol=1e-6)
    uniform = bd.assemble_student(teacher, library, [_index(library, bd.BlockShape(24, 1))] * 3)
    assert uniform.config.layer_shapes is None and uniform.config.mlp_dim == 24
    with pytest.raises(ValueError, match="no layers"):
        bd.assemble_student(teacher, library, [_index(library, bd.BlockShape(0, 0))] * 3)
    with pytest.raises(ValueError, match=r"indices\[1\]=99"):
        bd.assemble_student(teacher, library, [0, 99, 0])
    # its linear layer (x + W rmsnorm(x)) is the DeciLM format's linear attention: it exports and reads back
    folder = bd.to_hf(student, tmp_path / "student")
    again = bd.from_hf(folder)
    assert again.config == student.config.replace(attention_impl=again.config.attention_impl)
    np.testing.assert_allclose(again(tokens[0]).logits, student(tokens[0]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_the_budget_holds_for_the_students_real_parameters(setup, fraction):
    teacher, tokens, mask, library = setup
    scores = np.asarray(bd.swap_scores(library, teacher, tokens, mask), np.float64).T  # [layers, candidates]
    costs = {k: np.tile(v, (CONFIG.n_layers, 1)) for k, v in bd.candidate_costs(CONFIG, library.shapes, seq_len=16).items()}
    outer = bd.parameter_count(CONFIG) - sum(bd.block_parameters(CONFIG, s) for s in CONFIG.block_shapes)
    budget = fraction * bd.parameter_count(CONFIG)
    choice = bd.choose_blocks(scores, {"params": costs["params"]}, {"params": budget - outer})
    student = bd.assemble_student(teacher, library, choice.indices)
    model_params = sum(v.size for layer in range(student.config.n_layers) for v in bd.own_weights(student, layer).values())
    real = model_params + outer
    assert real == bd.parameter_count(student.config) <= budget
    # and it is the best choice: brute force over every assignment
    best = min(
        sum(scores[l, c] for l, c in enumerate(combo))
        for combo in itertools.product(range(len(library.shapes)), repeat=CONFIG.n_layers)
        if sum(costs["params"][l, c] for l, c in enumerate(combo)) <= budget - outer
    )
    np.testing.assert_allclose(choice.score, best, rtol=1e-9)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory):
    """A byte-level teacher of 3 layers whose blocks do real work (scaled weights)."""
    config = bd.TransformerConfig(vocab_size=256, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                  max_seq_len=64)
    model = bd.Transformer(config, key=jax.random.key(0))
    model = jax.tree.map(lambda x: x * 4 if eqx.is_inexact_array(x) and x.ndim == 3 else x, model)
    path = tmp_path_factory.mktemp("search-teacher") / "teacher"
    bd.save_model(model, path, tokenizer=bd.ByteTokenizer())
    return path


def _search_args(out, teacher, corpus, *extra):
    return ["search", "--out", str(out), "--teacher", str(teacher), "--data", str(corpus), "--steps", "4",
            "--checkpoint-every", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
            "--calibration-batches", "1", "--mlp-ratios", "1,0.5", "--warmup-steps", "1", "--no-progress",
            "--candidates-per-step", "4", *extra]


def test_search_command_resumes_and_writes_a_student(tmp_path, cli_teacher, corpus, capsys):
    import json
    import shutil

    from blockdistill.app.cli import main

    out = tmp_path / "search"
    assert main(_search_args(out, cli_teacher, corpus, "--budget", "params=0.6")) == 0
    printed = capsys.readouterr().out
    assert "chose (params=0.6, by kl)" in printed and "blockdistill distill --student" in printed
    choice = json.loads((out / "choice.json").read_text())
    student = bd.load_model(out / "student")
    teacher_config = bd.load_model(cli_teacher).config
    # the budget holds for the saved student's own parameters
    assert choice["costs"]["params"]["student"] == bd.parameter_count(student.config) <= 0.6 * bd.parameter_count(teacher_config)
    for name in ("scores.json", "scores.md", "scores_kl.png", "scores_blockwise.png"):
        assert (out / name).stat().st_size > 0
    scores = json.loads((out / "scores.json").read_text())
    assert np.asarray(scores["kl"]).shape == (len(choice["candidates"]), 3)
    # exported, the student is a DeciLM folder of exactly its own parameters, which
    # transformers loads (trust_remote_code) and runs to our logits
    import safetensors.numpy
    import torch
    import transformers

    assert main(["export-hf", str(out / "student"), str(tmp_path / "hf")]) == 0
    stored = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    assert sum(v.size for v in stored.values()) == bd.parameter_count(student.config)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = np.arange(12) % student.config.vocab_size
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].numpy()
    ours = np.asarray(student(jnp.asarray(ids, jnp.int32)).logits)
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))

    # killed after step 2: the same command resumes from that checkpoint to the same library
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    for name in ("scores.json", "choice.json", "student"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    assert main(_search_args(resumed, cli_teacher, corpus, "--budget", "params=0.6")) == 0
    assert "resuming the library from step 2" in capsys.readouterr().err
    again = json.loads((resumed / "scores.json").read_text())
    np.testing.assert_allclose(again["kl"], scores["kl"], rtol=1e-5, atol=1e-9)
    assert json.loads((resumed / "choice.json").read_text())["indices"] == choice["indices"]

    # a finished library is assembled again at once under another budget, its scores read back
    assert main(_search_args(out, cli_teacher, corpus, "--budget", "params=0.5,kv_bytes=0.5")) == 0
    assert "scores read back from" in capsys.readouterr().out
    tighter = json.loads((out / "choice.json").read_text())
    assert tighter["costs"]["params"]["fraction"] <= 0.5 and tighter["costs"]["kv_bytes"]["fraction"] <= 0.5
    assert tighter["search_cost"]["scores_cached"] and json.loads((out / "scores.json").read_text()) == scores
    # other scores, and a measured latency budget beside a parameter budget
    assert main(_search_args(out, cli_teacher, corpus, "--budget", "latency=0.8,params=0.9", "--score", "top1")) == 0
    timed = json.loads((out / "choice.json").read_text())
    assert timed["score"] == "top1" and timed["costs"]["latency"]["fraction"] <= 0.8
    assert timed["costs"]["params"]["fraction"] <= 0.9 and len(timed["latency"]["blocks_s"]) == len(timed["candidates"])
    assert (out / "scores_top1.png").is_file()
    # other training options are refused by name
    assert main(_search_args(out, cli_teacher, corpus, "--learning-rate", "0.01")) == 1
    assert "learning_rate: 0.001 -> 0.01" in capsys.readouterr().err

    # the student finishes with the main job
    run = tmp_path / "finish"
    assert main(["distill", "--out", str(run), "--teacher", str(cli_teacher), "--student", str(out / "student"),
                 "--data", str(corpus), "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
                 "--eval-batches", "1", "--checkpoint-every", "2", "--no-progress", "--no-plots"]) == 0
    assert bd.load_model(run / "student").config == bd.load_model(out / "student").config


def test_search_options_are_checked(tmp_path, cli_teacher, corpus, capsys):
    from blockdistill.app.cli import main

    for flag, value, message in (
        ("--budget", "param=0.5", "'param' is not one of"),
        ("--budget", "params=1.5", "params=1.5 must be in (0, 1]"),
        ("--score", "loss", "score='loss' is invalid"),
        ("--mlp-ratios", "1,half", "mlp_ratios='1,half' is invalid"),
        ("--kv-heads", "3", "kv_heads=(3,)"),
    ):
        assert main(_search_args(tmp_path / "bad", cli_teacher, corpus, flag, value)) == 1
        assert message in capsys.readouterr().err, (flag, value)
    assert main(_search_args(tmp_path / "bad", cli_teacher, corpus, "--budget", "params=0.01")) == 1
    assert "leaves nothing for the layers" in capsys.readouterr().err


def test_study_compares_with_every_uniform_student_that_fits(tmp_path):
    """experiments/search.py: the uniform students are the widest MLP (in eighths) for each
    KV-head and depth choice that fits the budget, and the report ranks by mean loss."""
    import importlib.util
    import pathlib

    path = REPO_ROOT / "experiments" / "search.py"
    spec = importlib.util.spec_from_file_location("search_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    teacher = bd.TransformerConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=256,
                                   max_seq_len=64)
    limit = 0.5 * bd.parameter_count(teacher)
    found = study.uniform_students(teacher, 0.5)
    assert {(f["student_layers"], f["student_n_layers"], f["kv_heads_ratio"]) for f in found} == {
        (layers, n, kv) for layers, n in (("all", None), ("group", 1), ("group", 2)) for kv in (1.0, 0.5)}
    for fields in found:
        student = bd.StudentConfig(mlp_ratio=fields["mlp_ratio"], layers=fields["student_layers"],
                                   n_layers=fields["student_n_layers"], kv_heads_ratio=fields["kv_heads_ratio"])
        assert bd.parameter_count(bd.student_config_for(teacher, student)) <= limit
        if fields["mlp_ratio"] < 1:  # one more eighth would not fit
            wider = student.replace(mlp_ratio=fields["mlp_ratio"] + 1 / 8)
            assert bd.parameter_count(bd.student_config_for(teacher, wider)) > limit
    for fields in found:  # refit to the budget's edge: the widest MLP in whole channels
        edge = study.edge_student(teacher, fields, 0.5)
        if edge is None:
            continue
        assert edge["mlp_ratio"] > fields["mlp_ratio"] and study.uniform_name(edge) != study.uniform_name(fields)
        fits = lambda ratio: bd.parameter_count(bd.student_config_for(teacher, bd.StudentConfig(  # noqa: E731
            mlp_ratio=ratio, layers=fields["student_layers"], n_layers=fields["student_n_layers"],
            kv_heads_ratio=fields["kv_heads_ratio"]))) <= limit
        assert fits(edge["mlp_ratio"]) and not fits(edge["mlp_ratio"] + 1 / teacher.mlp_dim)
    assert any(study.edge_student(teacher, fields, 0.5) for fields in found)
    # where not even an eighth of the MLP fits, the widest MLP in whole channels
    tight = study.uniform_students(teacher, 0.3)
    thin = [f for f in tight if f["student_layers"] == "all" and f["kv_heads_ratio"] == 1.0]
    assert len(thin) == 1 and 0 < thin[0]["mlp_ratio"] < 1 / 8, tight
    assert study.edge_student(teacher, thin[0], 0.3) is None  # already at the edge
    record = {"budget": 0.5, "params_fraction": 0.49, "initial_loss": 2.0, "teacher_loss": 1.0}
    results = {
        "finish/params=0.5/searched/seed0": {**record, "student": "searched", "seed": 0, "final_loss": 1.2},
        "finish/params=0.5/searched/seed1": {**record, "student": "searched", "seed": 1, "final_loss": 1.4},
        "finish/params=0.5/uniform-all-kv1-mlp0.5/seed0": {**record, "student": "uniform-all-kv1-mlp0.5",
                                                           "seed": 0, "final_loss": 1.25},
    }
    text = study.report(results, tmp_path / "images", tmp_path / "page.md")
    rows = [line for line in text.splitlines() if line.startswith("| searched") or line.startswith("| uniform")]
    assert rows[0].startswith("| uniform: all layers, KV heads x1, MLP x0.5 |")
    assert rows[0].endswith("| 1.2500 | 0.2500 |")  # ranked by mean: 1.25 < 1.30
    assert rows[1].endswith("| 1.2000 / 1.4000 | 1.3000 | 0.3000 |")
    assert (tmp_path / "images" / "search_students_params0.5.png").stat().st_size > 0
    assert "![search_students_params0.5](images/search_students_params0.5.png)" in text
    assert study.label("uniform-3L-kv0.25-mlp0.875") == "uniform: 3 layers, KV heads x0.25, MLP x0.875"
    assert study.label("uniform-1L-kv1-mlp1") == "uniform: 1 layer, KV heads x1, MLP x1"


def test_grouped_steps_train_the_library_to_the_same_numbers(setup):
    """Candidates trained in groups (one program each, on the same teacher states) follow
    exactly the single program's numbers."""
    teacher, tokens, mask, library = setup
    copy = lambda tree: jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)  # noqa: E731
    results = []
    for group_size in (None, 4):
        step = bd.LibraryStep(optimizer=bd.make_optimizer(1e-3, clip_norm=None), group_size=group_size)
        trained = copy(library)
        opt_state = step.init(trained)
        for _ in range(2):
            trained, opt_state, losses = step(trained, opt_state, teacher, tokens, mask)
        results.append((np.asarray(losses), trained))
    assert len(opt_state) == 3  # nine trained candidates in groups of four
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="group_size=0"):
        bd.LibraryStep(optimizer=bd.make_optimizer(1e-3), group_size=0)
    with pytest.raises(ValueError, match="build it with step.init"):
        bd.LibraryStep(optimizer=bd.make_optimizer(1e-3), group_size=2)(library, opt_state, teacher, tokens, mask)


def test_a_diverged_library_is_never_saved(tmp_path, cli_teacher, corpus, capsys, monkeypatch):
    """The block losses are computed before the update: a NaN update in step 4 leaves them
    finite at the step-4 checkpoint, so the weights are checked before saving; the step-2
    save in flight completes."""
    import optax

    from blockdistill.app import search as _search_command
    from blockdistill.app.cli import main

    real = _search_command.make_optimizer

    def poisoned(*args, **kwargs):
        def update(updates, count, params=None):
            poison = jnp.where(count == 3, jnp.nan, 0.0)  # each group of candidates: its fourth update
            return jax.tree.map(lambda u: u + poison, updates), count + 1

        return optax.chain(real(*args, **kwargs), optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32),
                                                                               update))

    monkeypatch.setattr(_search_command, "make_optimizer", poisoned)
    out = tmp_path / "search"
    assert main(_search_args(out, cli_teacher, corpus, "--budget", "params=0.6")) == 1
    err = capsys.readouterr().err
    assert "the library's weights became non-finite at step 4" in err and "checkpoints/2" in err
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]


def test_block_latencies_are_timed_once_and_read_back(tmp_path):
    shapes = (bd.BlockShape(48, 2), bd.BlockShape(24, 1), bd.BlockShape(0, 0, linear=True), bd.BlockShape(0, 0))
    timed = bd.block_latencies(CONFIG, shapes, batch_size=2, seq_len=16, rounds=3, cache=tmp_path)
    assert not timed["cached"] and timed["blocks"][3] == 0.0 and all(t > 0 for t in timed["blocks"][:3])
    assert timed["shared"] > 0
    again = bd.block_latencies(CONFIG, shapes, batch_size=2, seq_len=16, rounds=3, cache=tmp_path)
    assert again["cached"] and again["blocks"] == timed["blocks"]
    # another batch is another measurement
    assert not bd.block_latencies(CONFIG, shapes, batch_size=1, seq_len=16, rounds=1, cache=tmp_path)["cached"]
