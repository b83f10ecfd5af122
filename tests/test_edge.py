"""Tests of the on-device export (edge.py, edge_model.py): programs are run in ExecuTorch's own
runtime and compared with the eager model. fp32 logits equal eager's (a prompt over one call's
token bound, a chunk at an offset, single tokens), greedy generation from the program equals eager
KV-cache generation, layer-sharing blocks are stored once, an 8da4w program agrees with the fp32
model on held-out tokens (KL, top-1, perplexity) and runs the fake-quantized model of QAT (its
greedy output is the eager quantized model's), and the two commands (mobilellm-export --format
executorch, mobilellm-generate --pte) work end to end and refuse bad input. The exported cache
model equals eager across chunk boundaries with unwritten cache slots NaN, no op of its graph but
the cache ops spans the whole cache, no split runs outside XNNPACK's delegate (the unfused copy
that is lowered shares every other weight and computes the same), and exporting prints none of
the libraries' noise. With --embedding-quantize the table is looked up by ExecuTorch's quantized
embedding kernels: the program's logits are the eager quantized model's (int4 groups, fp32 linear
layers: to float rounding), its greedy output is mobilellm-generate's (int8 rows with 8da4w), and
no fp32 table of the vocabulary's size is left in it.

Skipped when ExecuTorch is not importable: install the edge extra (pip install -e '.[edge]').
"""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("executorch.runtime", reason="needs ExecuTorch: pip install -e '.[edge]'")
pytest.importorskip("torchao", reason="needs torchao: pip install -e '.[edge]'")

from conftest import init_model, subprocess_env, train_tiny_tokenizer  # noqa: E402
from test_generate import save_step_folder  # noqa: E402
from mobilellm_train import edge, edge_model  # noqa: E402
from mobilellm_train.generate import generate  # noqa: E402
from mobilellm_train.model import ModelArgs, count_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=64)
CONTEXT = 40
PREFILL = 8  # tokens per call: prompts over it are fed in chunks


def pattern_batch(generator, batch, length, noise=0.15):
    """Sequences of a fixed rule (next = 5 * token + 3 mod 97) with some random tokens: a tiny
    model learns confident, non-trivial predictions from it in a few seconds."""
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, ARGS.vocab_size, (batch,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = (5 * tokens[:, t - 1] + 3) % ARGS.vocab_size
        noisy = torch.rand(batch, generator=generator) < noise
        tokens[noisy, t] = torch.randint(0, ARGS.vocab_size, (int(noisy.sum()),), generator=generator)
    return tokens


@pytest.fixture(scope="module")
def trained():
    """A tiny tied model trained on pattern_batch: random weights give near-uniform logits, on
    which top-1 agreement would measure noise."""
    torch.manual_seed(0)
    model = init_model(ARGS, seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = pattern_batch(gen, 16, 33)
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@contextlib.contextmanager
def log_records_at_info():
    """The log records the root logger passes at INFO while inside (a StringIO), as a command that
    sets up logging at INFO would print them; the root's handlers and level restored after."""
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def programs(tmp_path_factory, trained):
    """fp32 programs of the trained tied model and of an LS model, an 8da4w program, and two with
    the embedding table quantized: int4 in groups of 16 with fp32 linear layers, int8 rows with
    8da4w."""
    folder = tmp_path_factory.mktemp("pte")
    ls_model = init_model(replace(ARGS, layer_sharing=True), seed=5)
    paths = {}
    # What the exports print, at the file-descriptor level (the libraries write from C++ too), and
    # the log records a command that sets up logging at INFO (mobilellm-export) would print.
    sys.stderr.flush()
    saved = os.dup(2)
    with log_records_at_info() as records, open(folder / "stderr.txt", "w+") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            # The two with a quantized table take one token a call: half the export's time, and
            # the lookup is the same.
            for name, model, quantize, embedding, prefill in [
                ("fp32", trained, "none", "none", PREFILL), ("ls", ls_model, "none", "none", PREFILL),
                ("8da4w", trained, "8da4w", "none", PREFILL), ("E4,16", trained, "none", "4,16", 1),
                ("8da4w E8,0", trained, "8da4w", "8,0", 1),
            ]:
                paths[name] = edge.write_program(model, str(folder / f"{name}.pte"), max_context=CONTEXT,
                                                 quantize=quantize, max_prefill=prefill, embedding_quantize=embedding)
            edge.EdgeProgram(paths["fp32"]).forward([1, 2, 3], 0)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        stderr = captured.read()
    return {"paths": paths, "ls_model": ls_model, "stderr": stderr + records.getvalue()}


def last_logits(forward, tokens, pieces):
    """The logits of the last token of each piece (a, b) of tokens, fed in order."""
    return torch.cat([forward(tokens[a:b], a) for a, b in pieces])


@pytest.mark.parametrize("variant", ["fp32", "ls"])
def test_fp32_program_logits_equal_eager_in_the_runtime(programs, trained, variant):
    model = trained if variant == "fp32" else programs["ls_model"]
    program = edge.EdgeProgram(programs["paths"][variant])
    assert program.max_prefill == PREFILL
    tokens = torch.randint(0, ARGS.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens[None])[0]
    # A prompt longer than one call (two chunks of PREFILL), a chunk at an offset, single tokens:
    # each call reads what earlier calls cached.
    pieces = [(0, 11), (11, 18), (18, 19), (19, 20), (20, 30)]
    got = last_logits(program.forward, tokens, pieces)
    torch.testing.assert_close(got, want[[b - 1 for _, b in pieces]], rtol=1e-4, atol=1e-4)
    # Every position, one call each.
    got = last_logits(program.forward, tokens, [(i, i + 1) for i in range(30)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # A second sequence overwrites the first from position 0: no stale keys leak into it.
    other = tokens.flip(0)
    with torch.no_grad():
        torch.testing.assert_close(program.forward(other[:9], 0), model(other[None, :9])[0, -1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="context of 40"):
        program.forward(tokens[:5], CONTEXT - 4)
    with pytest.raises(ValueError, match="vocabulary"):
        program.forward([3, ARGS.vocab_size], 0)


@pytest.mark.parametrize("variant", ["fp32", "ls"])
def test_greedy_generation_from_the_program_equals_eager_kv_cache(programs, trained, variant):
    model = trained if variant == "fp32" else programs["ls_model"]
    program = edge.EdgeProgram(programs["paths"][variant])
    prompt = [7, 38, 0, 3, 18]
    (want,) = generate(model, prompt, max_new_tokens=25)
    (got,) = edge.generate_pte(program, prompt, max_new_tokens=25)
    assert got == want and len(got) == 25
    # The total length stops at the program's context, and EOS ends a sample before it.
    (long,) = edge.generate_pte(program, prompt, max_new_tokens=100)
    assert len(long) == CONTEXT - len(prompt)
    eos = want[6]
    assert edge.generate_pte(program, prompt, 25, eos_id=eos) == [want[: want.index(eos)]]
    a = edge.generate_pte(program, prompt, 10, temperature=1.0, num_samples=3, seed=4)
    assert a == edge.generate_pte(program, prompt, 10, temperature=1.0, num_samples=3, seed=4) and len(a) == 3


def test_layer_sharing_blocks_are_stored_once(programs):
    plain, ls = (os.path.getsize(programs["paths"][k]) for k in ("fp32", "ls"))
    param_bytes = 4 * count_params(ARGS)
    embedding_bytes = 4 * ARGS.vocab_size * ARGS.dim
    block_bytes = param_bytes - embedding_bytes - 4 * ARGS.dim
    # Duplicated blocks would add block_bytes; the LS program only has more instructions.
    assert ls - plain < 0.25 * block_bytes, (plain, ls, block_bytes)
    # The weights once, plus the tied table kept twice (the embedding and the XNNPACK output
    # layer's own copy) and the program's fixed overhead.
    assert plain < param_bytes + embedding_bytes + 96 * 1024, (plain, param_bytes)


def test_8da4w_program_agrees_with_fp32_eager_on_held_out_tokens(programs, trained):
    program = edge.EdgeProgram(programs["paths"]["8da4w"])
    assert program.info.quantize == "8da4w"
    held_out = pattern_batch(torch.Generator().manual_seed(123), 6, CONTEXT)
    with torch.no_grad():
        result = edge.compare_with_eager(program, trained, held_out)
    assert result["positions"] == 6 * CONTEXT
    assert result["top1"] >= 0.9, result
    assert result["kl"] < 0.05, result
    assert result["perplexity_program"] < 1.05 * result["perplexity_eager"], result
    # The rule is learnt: far below the 97 of a uniform guess.
    assert result["perplexity_eager"] < 8, result
    fp32_program = edge.EdgeProgram(programs["paths"]["fp32"])
    exact = edge.compare_with_eager(fp32_program, trained, held_out)
    assert exact["top1"] == 1.0 and exact["kl"] < 1e-6 and result["kl"] > exact["kl"]
    assert os.path.getsize(program.path) < 0.6 * os.path.getsize(fp32_program.path)


def test_8da4w_program_runs_the_fake_quantized_model(programs, trained):
    """What QAT trains is what ships: the 8da4w program's logits are the fake-quantized model's
    (quantization.apply_qat) up to XNNPACK's integer arithmetic, far closer than to the fp32
    model's, and its greedy output is the eager quantized model's (mobilellm-generate --quantize)."""
    import copy

    from mobilellm_train.quantization import apply_ptq, apply_qat, set_fake_quantization

    program = edge.EdgeProgram(programs["paths"]["8da4w"])
    fake_quantized, quantized = copy.deepcopy(trained), copy.deepcopy(trained)
    apply_qat(fake_quantized, "8da4w", 32)
    set_fake_quantization(fake_quantized, True)
    apply_ptq(quantized, "8da4w", 32)
    tokens = pattern_batch(torch.Generator().manual_seed(5), 1, 30)[0]
    with torch.no_grad():
        want, fp32 = fake_quantized(tokens[None])[0], trained(tokens[None])[0]
    got = last_logits(program.forward, tokens, [(i, i + 1) for i in range(30)])
    gap = (got - want).abs().max().item()
    assert gap < 1e-4 and (fp32 - want).abs().max() > 0.1, gap  # bf16 group scales: the program computes eager's numbers
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    for prompt in ([7, 38, 0, 3, 18], [1, 2, 3]):
        assert edge.generate_pte(program, prompt, max_new_tokens=25) == generate(quantized, prompt, max_new_tokens=25)


def quantized_copy(model, quantize, embedding):
    """`model` quantized as mobilellm-generate and mobilellm-eval --quantize --embedding-quantize do."""
    import copy

    from mobilellm_train.evaluation.loading import apply_program_quantization
    from mobilellm_train.quantization import parse_embedding_scheme

    quantized = copy.deepcopy(model)
    apply_program_quantization(quantized, "", quantize, 32, parse_embedding_scheme(embedding))
    return quantized


def test_quantized_embedding_program_computes_the_eager_quantized_model(programs, trained):
    """The int4 table (groups of 16) looked up by ExecuTorch's embedding_4bit kernel, with fp32
    linear layers: the program's logits are the eager quantized model's to float rounding, and so
    its greedy output; the int8 table (per row) with 8da4w layers gives mobilellm-generate's greedy
    output, its logits within XNNPACK's integer arithmetic."""
    quantized = quantized_copy(trained, "none", "4,16")
    program = edge.EdgeProgram(programs["paths"]["E4,16"])
    assert program.info.embedding_quantize == "4,16" and program.info.quantize == "none"
    tokens = pattern_batch(torch.Generator().manual_seed(5), 1, 30)[0]
    pieces = [(0, 11), (11, 18), (18, 19), (19, 30)]
    with torch.no_grad():
        want, fp32 = quantized(tokens[None])[0], trained(tokens[None])[0]
    assert program.max_prefill == 1  # a prompt is fed a token a call
    torch.testing.assert_close(last_logits(program.forward, tokens, pieces), want[[b - 1 for _, b in pieces]],
                               rtol=1e-4, atol=1e-4)
    assert (want - fp32).abs().max() > 1e-2  # the int4 table does change the numbers
    both = quantized_copy(trained, "8da4w", "8,0")
    program8 = edge.EdgeProgram(programs["paths"]["8da4w E8,0"])
    with torch.no_grad():
        want8 = both(tokens[None])[0]
    got8 = last_logits(program8.forward, tokens, [(i, i + 1) for i in range(30)])
    assert (got8 - want8).abs().max() < 0.1 and (got8.argmax(-1) == want8.argmax(-1)).float().mean() >= 0.95
    for prompt in ([7, 38, 0, 3, 18], [1, 2, 3]):
        assert edge.generate_pte(program, prompt, max_new_tokens=25) == generate(quantized, prompt, max_new_tokens=25)
        assert edge.generate_pte(program8, prompt, max_new_tokens=25) == generate(both, prompt, max_new_tokens=25)


def program_tensors(path):
    """(name of each kernel the program calls, (dtype, shape) of each constant tensor outside the
    delegates), read from the .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import ScalarType

    with open(path, "rb") as f:
        program = deserialize_pte_binary(f.read())
    plan = getattr(program, "program", program).execution_plan[0]
    kernels = {f"{op.name}.{op.overload}" for op in plan.operators}
    constants = [(ScalarType(v.val.scalar_type).name, list(v.val.sizes)) for v in plan.values
                 if type(v.val).__name__ == "Tensor" and v.val.allocation_info is None and v.val.data_buffer_idx > 0]
    return kernels, constants


def test_quantized_embedding_program_holds_no_fp32_table(programs):
    vocab, dim = ARGS.vocab_size, ARGS.dim
    kernels, constants = program_tensors(programs["paths"]["8da4w"])
    assert ("FLOAT", [vocab, dim]) in constants  # today's program: the fp32 table for the lookup
    for name, table, scales, kernel in [("8da4w E8,0", ("CHAR", [vocab, dim]), ("HALF", [vocab, 1]), "embedding_byte"),
                                        ("E4,16", ("BYTE", [vocab, dim // 2]), ("HALF", [vocab, 4]), "embedding_4bit")]:
        kernels, constants = program_tensors(programs["paths"][name])
        assert table in constants and scales in constants, (name, constants)
        assert not [c for c in constants if c[0] == "FLOAT" and vocab in c[1]], (name, constants)
        assert f"quantized_decomposed::{kernel}.dtype_out" in kernels, (name, kernels)
    # Nor inside XNNPACK's delegate: against the 8da4w program, the int8 program saves the fp32
    # table and adds only the int8 one and its scales (and a few instructions).
    plain, quantized = (os.path.getsize(programs["paths"][k]) for k in ("8da4w", "8da4w E8,0"))
    assert quantized < plain - 4 * vocab * dim + vocab * dim + 2 * vocab + 2048, (plain, quantized)


def test_options_are_checked(tmp_path, trained):
    with pytest.raises(edge.EdgeError, match="max_seq_len 64"):
        edge.write_program(trained, str(tmp_path / "m.pte"), max_context=65)
    with pytest.raises(edge.EdgeError, match="--group-size 48"):
        edge.write_program(trained, str(tmp_path / "m.pte"), max_context=8, quantize="8da4w", group_size=48)
    with pytest.raises(edge.EdgeError, match=r"--embedding-quantize 4,48: group size 48 does not divide the "
                                             r"embedding width 64; .* divisors: 2, 4, 8, 16, 32, 64$"):
        edge.write_program(trained, str(tmp_path / "m.pte"), max_context=8, embedding_quantize="4,48")
    with pytest.raises(edge.EdgeError, match="BITS 8 or 4"):
        edge.write_program(trained, str(tmp_path / "m.pte"), max_context=8, embedding_quantize="2,0")
    with pytest.raises(edge.EdgeError, match="ends in .pte"):
        edge.write_program(trained, str(tmp_path / "m.bin"), max_context=8)
    assert os.listdir(tmp_path) == []
    with pytest.raises(edge.EdgeError, match="--max-prefill 9"):
        edge.StaticCacheModel(trained, 8, max_prefill=9)


@pytest.mark.parametrize("layer_sharing", [False, True])
def test_cache_model_equals_eager_across_chunks(layer_sharing):
    """StaticCacheModel, what is exported, run eagerly on ExecuTorch's ops: each call's last
    logits equal the model's at that position, for a prompt, chunks that cross a chunk boundary
    and single tokens; cache slots not yet written (NaN here: the runtime leaves that memory as it
    finds it) are never read."""
    model = init_model(replace(ARGS, layer_sharing=layer_sharing), seed=7).eval()
    wrapper = edge.StaticCacheModel(model, 24, max_prefill=8)
    assert wrapper.num_passes == ARGS.n_layers * (2 if layer_sharing else 1)
    for name, buffer in wrapper.named_buffers():
        if "cache" in name:
            buffer.fill_(float("nan"))
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    pieces = [(0, 5), (5, 13), (13, 14), (14, 21), (21, 22), (22, 24)]
    with torch.no_grad():
        want = model(tokens)[0]
        got = last_logits(lambda t, a: wrapper(t[None], torch.tensor([a])), tokens[0], pieces)
        torch.testing.assert_close(got, want[[b - 1 for _, b in pieces]], rtol=1e-5, atol=1e-5)
        # Greedy decoding through the wrapper equals eager KV-cache generation, token for token.
        prompt = tokens[0, :6].tolist()
        (expected,) = generate(model, prompt, max_new_tokens=12)
        logits, out = wrapper(torch.tensor([prompt]), torch.tensor([0])), []
        for position in range(len(prompt), len(prompt) + 12):
            out.append(int(logits.argmax()))
            logits = wrapper(torch.tensor([[out[-1]]]), torch.tensor([position]))
        assert out == expected


def test_no_op_of_the_exported_graph_spans_the_whole_cache():
    """The cost of a call follows the filled positions: apart from the cache buffers themselves,
    which only the cache update and the attention op take, no tensor of the exported graph has a
    dimension of the cache's length (the old program masked and expanded the whole cache in
    every call), and nothing is of the vocabulary's size but the one row of logits."""
    from torch.export import Dim, export

    context = 37  # a length no other dimension of this model has
    wrapper = edge.StaticCacheModel(init_model(ARGS, seed=3).eval(), context, max_prefill=8)
    with torch.no_grad():
        exported = export(wrapper, (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                          dynamic_shapes={"tokens": {1: Dim("tokens", min=1, max=8)}, "input_pos": None}, strict=False)
    cache_users = set()
    for node in exported.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" or not isinstance(value, torch.Tensor):
            continue
        sizes = [d for d in value.shape if isinstance(d, int)]  # the token count is symbolic
        if context in sizes:
            cache_users.add(str(node.target))
        if ARGS.vocab_size in sizes:
            assert list(value.shape) == [1, ARGS.vocab_size], (node, value.shape)
    assert cache_users <= {"llama.update_cache.default", "llama.custom_sdpa.default"}, cache_users
    targets = {str(n.target) for n in exported.graph.nodes}
    assert {"llama.update_cache.default", "llama.custom_sdpa.default"} <= targets


def test_unfused_copy_shares_all_but_the_fused_weights_and_computes_the_same():
    model = init_model(replace(ARGS, layer_sharing=True), seed=4).eval()
    fused = {name: p.clone() for name, p in model.named_parameters()}
    copy = edge.unfused_copy(model)
    attn, ff = copy.layers[0].attention, copy.layers[0].feed_forward
    assert not hasattr(attn, "wqkv") and not hasattr(ff, "w13")
    torch.testing.assert_close(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]),
                               model.layers[0].attention.wqkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([ff.w1.weight, ff.w3.weight]), model.layers[0].feed_forward.w13.weight,
                               rtol=0, atol=0)
    assert copy.tok_embeddings.weight is model.tok_embeddings.weight  # shared, not copied
    assert copy.layers[1].attention_norm.weight is model.layers[1].attention_norm.weight
    # The caller's model is as it was: fused, with the same values.
    assert {name: p for name, p in model.named_parameters()}.keys() == fused.keys()
    for name, p in model.named_parameters():
        assert torch.equal(p, fused[name]), name
    tokens = torch.randint(0, ARGS.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = edge.StaticCacheModel(model, 16, max_prefill=8)(tokens, torch.tensor([0]))
        got = edge.StaticCacheModel(copy, 16, max_prefill=8)(tokens, torch.tensor([0]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_no_split_runs_outside_the_delegate(programs):
    """A split or a chunk between two delegated ops would cut XNNPACK's graph in two, one more
    delegate call per block: none is left in the programs (fused projections are unfused for the
    export, the rotary half-turn is a product)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    for name in programs["paths"]:
        with open(programs["paths"][name], "rb") as f:
            program = deserialize_pte_binary(f.read())
        plan = getattr(program, "program", program).execution_plan[0]
        kernels = {plan.operators[i.instr_args.op_index].name for chain in plan.chains for i in chain.instructions
                   if type(i.instr_args).__name__ == "KernelCall"}
        assert not {k for k in kernels if "split" in k or "chunk" in k}, (name, sorted(kernels))


def test_export_prints_no_library_noise(programs):
    """What torchao, cpuinfo and the custom ops print when loaded or run is kept from the user."""
    noise = programs["stderr"]
    for marker in ("cpuinfo", "Failed to load", "torchao", "kernel_runtime_context", "LeafSpec", "Enum subclass",
                   "triton", "libcustom_ops_aot_lib", "custom ops library", "Copying constant nodes"):
        assert marker not in noise, noise[-3000:]


def test_the_libraries_log_records_of_noise_are_dropped_and_others_kept():
    """The records torchao and ExecuTorch log while importing and lowering (issue 32), as a command
    that set up logging at INFO would print them: dropped inside maybe_quiet_native_noise only."""
    with log_records_at_info() as records:
        with edge.maybe_quiet_native_noise():
            logging.getLogger("torchao.kernel.intmm").warning(
                "Warning: Detected no triton, on systems without Triton certain kernels will not work")
            logging.info("Looking for libcustom_ops_aot_lib.so in /site-packages/executorch/extension/llm/custom_ops")
            logging.info("Loading custom ops library: /x/libcustom_ops_aot_lib.so")
            logging.info("Copying constant nodes p_layers_0_w and creating p_layers_0_w_copy_0")
            logging.getLogger("mobilellm_train").warning("a warning of ours")
        logging.info("Copying constant nodes outside the block")
    assert records.getvalue() == "a warning of ours\nCopying constant nodes outside the block\n"
    root = logging.getLogger()
    assert not any(isinstance(f, edge_model._NoiseFilter) for h in root.handlers for f in h.filters)


def _tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = train_tiny_tokenizer(tmp_path)
    return spm.SentencePieceProcessor(model_file=path), path


@pytest.mark.slow
def test_export_and_generate_commands(tmp_path):
    sp, tokenizer = _tokenizer(tmp_path)
    model = init_model(replace(ARGS, layer_sharing=True), seed=11)
    step = save_step_folder(model, tmp_path / "step-5", tokenizer)
    out = tmp_path / "phone" / "model.pte"
    env = subprocess_env(OMP_NUM_THREADS="1")
    export = [sys.executable, "-m", "mobilellm_train.export", "--checkpoint", step, "--format", "executorch",
              "--out", str(out), "--max-context", "24"]
    r = subprocess.run(export + ["--report"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out.parent)) == ["model.json", "model.pte", "tokenizer.model"]
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert report["program_bytes"] == os.path.getsize(out) and report["max_context"] == 24
    assert report["agreement"]["top1"] == 1.0 and report["agreement"]["data"] == "random tokens"
    assert report["runtime"]["decode_tokens_per_s"] > 0 and report["eager"]["prefill_tokens_per_s"] > 0
    with open(out.parent / "model.json") as f:
        info = json.load(f)
    assert info["layer_sharing"] is True and info["max_context"] == 24 and info["quantize"] == "none"
    assert info["executorch_version"] == report["executorch"] != "unknown"

    generate_cmd = [sys.executable, "-m", "mobilellm_train.generate", "--pte", str(out), "--prompt", "the dog",
                    "--max-new-tokens", "8"]
    r = subprocess.run(generate_cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    prompt = [1] + sp.encode("the dog")
    (expected,) = generate(model, prompt, 8, eos_id=2, vocab_limit=sp.vocab_size())
    assert r.stdout.strip().splitlines() == ["=== prompt 1 ===", sp.decode(prompt + expected)]


def test_commands_refuse_bad_input(tmp_path, programs, capsys):
    from mobilellm_train import export, generate as generate_module

    pte = programs["paths"]["fp32"]
    # Nothing is replaced without --overwrite, and the check comes before the slow work.
    before = open(pte, "rb").read()
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path), "--format", "executorch", "--out", pte])
    assert e.value.code == 1 and "pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path), "--format", "executorch", "--out", str(tmp_path / "m.pte")])
    assert e.value.code == 1 and "neither a complete DCP step folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path), "--format", "executorch", "--out", str(tmp_path / "m.pte"),
                     "--dtype", "bfloat16"])
    assert e.value.code == 1 and "--quantize" in capsys.readouterr().err
    with pytest.raises(edge.EdgeError, match="--overwrite"):
        edge.write_program(init_model(ARGS), pte, max_context=8)
    assert open(pte, "rb").read() == before

    def run_generate(*argv):
        with pytest.raises(SystemExit) as e:
            generate_module.main(["--prompt", "x", *argv])
        return e.value.code, capsys.readouterr().err

    code, err = run_generate("--pte", pte, "--checkpoint", str(tmp_path))
    assert code == 2 and "exactly one of --checkpoint" in err
    missing = str(tmp_path / "nothing.pte")
    code, err = run_generate("--pte", missing)
    assert code == 1 and f"--pte {missing}: no such file" in err
    # A damaged program is reported as such, not a crash; so is a program without its description.
    bad = tmp_path / "bad.pte"
    bad.write_bytes(before[: len(before) // 3])
    (tmp_path / "bad.json").write_bytes(open(edge.meta_path(pte), "rb").read())
    code, err = run_generate("--pte", str(bad))
    assert code == 1 and "cannot load it" in err, err
    os.remove(tmp_path / "bad.json")
    code, err = run_generate("--pte", str(bad))
    assert code == 1 and "bad.json is missing" in err, err
