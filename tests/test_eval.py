"""Tests of mobilellm_train.evaluation: task files in their public layouts -> the harness's
requests, loglikelihood scoring (multi-token continuations, acc vs acc_norm, winogrande's partial
scoring), perplexity, the results table, the CLI, and evaluation on two FSDP ranks.

Scores are checked against models whose answers are known: a bigram "model" whose logits are a
fixed table (uniform, or one that strongly expects the alphabet to continue), and a character
tokenizer, so every log-probability can be computed by hand.
"""

import json
import math
import os
import string
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_corpus, subprocess_env
from mobilellm_train.data.jsonl import DataError, JsonlTokenDataset
from mobilellm_train.evaluation.perplexity import (
    evaluate_perplexity,
    find_wikitext,
    jsonl_documents,
    pack_windows,
    read_wikitext_rows,
    shard_tokens,
    token_documents,
    wikitext_windows,
)
from mobilellm_train.evaluation.report import PAPER_RESULTS, format_table, results_to_scalars
from mobilellm_train.evaluation.scoring import (
    TaskResult,
    choose,
    continuation_logprobs,
    encode_pair,
    evaluate_tasks,
    score_examples,
)
from mobilellm_train.evaluation.tasks import (
    TASKS,
    Example,
    TaskDataError,
    check_task_files,
    load_task,
    parse_task_names,
    winogrande_example,
)
from mobilellm_train.model import MobileLLM, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = string.printable
VOCAB = 3 + len(CHARS)  # unk, bos, eos, then one id per character


class CharTokenizer:
    """One token per character: encode(a + b) == encode(a) + encode(b), so the harness's split of
    context and continuation is exact and every score can be computed by hand."""

    bos_id, eos_id, vocab_size = 1, 2, VOCAB

    def encode(self, text):
        return [3 + CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i - 3] for i in ids if i >= 3)


class BigramModel(nn.Module):
    """logits[b, t] = table[tokens[b, t]]: the next token depends only on the current one."""

    def __init__(self, table, max_seq_len=2048):
        super().__init__()
        self.table = nn.Parameter(table)
        self.args = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, tokens, labels=None):
        logits = self.table[tokens]
        return logits if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())


ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def alphabet_model(strength=8.0):
    """Strongly expects each letter to be followed by the next one (z by a space, a space by a)."""
    tok = CharTokenizer()
    table = torch.zeros(VOCAB, VOCAB)
    for a, b in zip(ALPHABET, ALPHABET[1:] + ALPHABET[0]):
        table[tok.encode(a)[0], tok.encode(b)[0]] = strength
    return BigramModel(table)


def bigram_logprob(model, ids):
    """Sum of log p(ids[i+1] | ids[i]), by hand."""
    logp = F.log_softmax(model.table.detach(), dim=-1)
    return sum(logp[a, b].item() for a, b in zip(ids, ids[1:]))


# --- Task files ---------------------------------------------------------------------------------

GOLDS = ["cdefg", "mnopq", "rstuv", "hijkl"]  # continue the alphabet
BADS = ["qzkx", "fbmw", "zqjv", "wkbq", "pxzm"]  # break it at every step


def pattern_choices(i, n):
    options = [BADS[(i + j) % len(BADS)] for j in range(n)]
    gold = i % n
    options[gold] = GOLDS[i % len(GOLDS)]
    return options, gold


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_task_data(data_dir, n=3):
    """All eight tasks, each in one of its published layouts (hub Parquet for some, the original
    JSONL releases for others), with n examples whose gold answer continues the alphabet."""
    d = str(data_dir)
    arc, arc_c, boolq, piqa, piqa_labels, siqa, hellaswag, obqa, wino = ([] for _ in range(9))
    for i in range(n):
        options, gold = pattern_choices(i, 4)
        arc.append({"id": f"e{i}", "question": f"Which one {i}?", "answerKey": "ABCD"[gold],
                    "choices": {"text": options, "label": list("ABCD")}})
        arc_c.append({"id": f"c{i}", "answerKey": "1234"[gold], "question": {
            "stem": f"Which one {i}?", "choices": [{"text": t, "label": l} for t, l in zip(options, "1234")]}})
        boolq.append({"question": f"is it so {i}", "passage": "Some passage.", "answer": False, "title": "t"})
        options2, gold2 = pattern_choices(i, 2)
        piqa.append({"goal": f"How to do {i}", "sol1": options2[0], "sol2": options2[1]})
        piqa_labels.append(str(gold2))
        options3, gold3 = pattern_choices(i, 3)
        siqa.append({"context": "Ctx.", "question": f"What {i}?", "answerA": options3[0],
                     "answerB": options3[1], "answerC": options3[2], "label": str(gold3 + 1)})
        hellaswag.append({"ind": i, "activity_label": "Act", "ctx_a": "Something happens.", "ctx_b": "then",
                          "ctx": "Something happens. then", "endings": options, "source_id": "s",
                          "split": "val", "split_type": "indomain", "label": str(gold)})
        obqa.append({"id": f"o{i}", "question_stem": f"The sun is {i}", "answerKey": "ABCD"[gold],
                     "choices": {"text": options, "label": list("ABCD")}})
        # The option ending in z makes " abcd" after the blank likely; the one ending in q does not.
        wino.append({"qID": f"w{i}", "sentence": "Put _ abcd", "option1": "xyz" if gold2 == 0 else "mnq",
                     "option2": "mnq" if gold2 == 0 else "xyz", "answer": str(gold2 + 1)})
    write_parquet(f"{d}/arc_easy/ARC-Easy/test-00000-of-00001.parquet", arc)
    write_jsonl(f"{d}/arc_challenge/ARC-Challenge-Test.jsonl", arc_c)
    write_parquet(f"{d}/boolq/data/validation-00000-of-00001.parquet", boolq)
    write_jsonl(f"{d}/piqa/valid.jsonl", piqa)
    with open(f"{d}/piqa/valid-labels.lst", "w") as f:
        f.write("\n".join(piqa_labels) + "\n")
    write_parquet(f"{d}/siqa/validation-00000-of-00001.parquet", siqa)
    write_parquet(f"{d}/hellaswag/data/validation-00000-of-00001.parquet", hellaswag)
    write_parquet(f"{d}/obqa/main/test-00000-of-00001.parquet", obqa)
    write_jsonl(f"{d}/winogrande/dev.jsonl", wino)
    return d


# --- Requests: prompts, choices, gold ----------------------------------------------------------


def test_task_requests_follow_the_harness_templates(tmp_path):
    data = write_task_data(tmp_path, n=2)
    ex = {name: load_task(name, data) for name in TASKS}
    assert all(len(v) == 2 for v in ex.values())
    # Example 1 of 4 choices has its gold at index 1; of 3 at 1; of 2 at 1.
    arc = ex["arc_easy"][1]
    assert arc.requests[0][0] == "Question: Which one 1?\nAnswer:"
    assert [c for _, c in arc.requests] == [" " + t for t in arc.choices]
    assert arc.choices[arc.gold] == "mnopq" and arc.gold == 1
    assert ex["arc_challenge"][1] == arc  # the original nested layout with numeric labels
    boolq = ex["boolq"][0]
    assert boolq.requests == (("Some passage.\nQuestion: is it so 0?\nAnswer:", " no"),
                              ("Some passage.\nQuestion: is it so 0?\nAnswer:", " yes"))
    assert boolq.gold == 0
    assert ex["piqa"][1].requests[0][0] == "Question: How to do 1\nAnswer:" and ex["piqa"][1].gold == 1
    assert ex["siqa"][1].requests[0][0] == "Q: Ctx. What 1?\nA:" and ex["siqa"][1].gold == 1
    hs = ex["hellaswag"][1]
    assert hs.requests[0][0] == "Act: Something happens. Then" and hs.gold == 1
    assert ex["obqa"][1].requests[0] == ("The sun is 1", " " + ex["obqa"][1].choices[0])
    wino = ex["winogrande"][1]
    assert wino.requests == (("Put mnq", " abcd"), ("Put xyz", " abcd")) and wino.gold == 1
    assert len(load_task("hellaswag", data, limit=1)) == 1


def test_hellaswag_preprocessing_and_original_jsonl(tmp_path):
    row = {"activity_label": "Home [title] Clean", "ctx_a": "Wipe it [step] now.", "ctx_b": "you SHOULD",
           "endings": [" rinse  it [header] well.", "dry it."], "label": 0}
    write_jsonl(f"{tmp_path}/hellaswag/hellaswag_val.jsonl", [row])
    (example,) = load_task("hellaswag", str(tmp_path))
    assert example.requests[0][0] == "Home. Clean: Wipe it now. You should"
    assert example.choices == ("rinse it well.", "dry it.")


def test_winogrande_scores_only_the_words_after_the_blank():
    tok = CharTokenizer()
    table = torch.zeros(VOCAB, VOCAB)
    x, space, q, w = (tok.encode(c)[0] for c in "x qw")
    table[space, w] = 10.0  # "w" is by far the likelier word after "x "...
    table[q, space] = 10.0  # ...but only "q" makes the rest of the sentence likely.
    model = BigramModel(table)
    example = winogrande_example({"sentence": "x _ yz", "option1": "q", "option2": "w", "answer": "1"})
    assert example.requests == (("x q", " yz"), ("x w", " yz"))
    correct, correct_norm, total = score_examples(model, tok, [example], batch_size=2)
    assert (correct, total) == (1, 1)
    # Whole-sentence scoring would have chosen "w": the partial score is what decides.
    whole = [bigram_logprob(model, [1] + tok.encode(s)) for s in ("x q yz", "x w yz")]
    assert whole[1] > whole[0]


def test_missing_task_data_names_the_expected_files(tmp_path):
    with pytest.raises(TaskDataError) as e:
        load_task("obqa", str(tmp_path))
    assert "obqa/: main/test-*.parquet" in str(e.value) and "allenai/openbookqa" in str(e.value)
    os.makedirs(tmp_path / "piqa")
    write_jsonl(f"{tmp_path}/piqa/valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(TaskDataError, match="valid-labels.lst"):
        load_task("piqa", str(tmp_path))
    with pytest.raises(TaskDataError, match="unknown task"):
        load_task("mmlu", str(tmp_path))
    assert parse_task_names("winogrande, boolq,commonsense") == list(TASKS)
    assert parse_task_names("obqa,boolq") == ["boolq", "obqa"] and parse_task_names("") == []
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        parse_task_names("boolq,mmlu")


def test_public_release_layouts_are_found(tmp_path):
    """The files where the public dataset repositories keep them (as `huggingface-cli download
    --local-dir <data>/<repository>` or a copy of an original release leaves them) read as the
    same examples as the task-named folders."""
    reference = write_task_data(tmp_path / "ref", n=2)
    expected = {name: load_task(name, reference) for name in TASKS}
    ref, d = str(tmp_path / "ref"), str(tmp_path / "public")

    def copy(src, dst):
        os.makedirs(os.path.dirname(f"{d}/{dst}"), exist_ok=True)
        with open(f"{ref}/{src}", "rb") as f_in, open(f"{d}/{dst}", "wb") as f_out:
            f_out.write(f_in.read())

    copy("arc_easy/ARC-Easy/test-00000-of-00001.parquet", "ai2_arc/ARC-Easy/test-00000-of-00001.parquet")
    copy("arc_challenge/ARC-Challenge-Test.jsonl", "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl")
    boolq = pq.read_table(f"{ref}/boolq/data/validation-00000-of-00001.parquet").to_pylist()
    write_parquet(f"{d}/super_glue/boolq/validation-00000-of-00001.parquet",  # SuperGLUE's int label
                  [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                   for i, r in enumerate(boolq)])
    labels = open(f"{ref}/piqa/valid-labels.lst").read().split()
    piqa = [json.loads(line) for line in open(f"{ref}/piqa/valid.jsonl")]
    write_parquet(f"{d}/piqa/validation.parquet", [{**r, "label": int(lab)} for r, lab in zip(piqa, labels)])
    siqa = pq.read_table(f"{ref}/siqa/validation-00000-of-00001.parquet").to_pylist()
    write_jsonl(f"{d}/social_i_qa/socialiqa-train-dev/dev.jsonl", [{k: v for k, v in r.items() if k != "label"}
                                                                   for r in siqa])
    with open(f"{d}/social_i_qa/socialiqa-train-dev/dev-labels.lst", "w") as f:
        f.write("".join(r["label"] + "\n" for r in siqa))
    copy("hellaswag/data/validation-00000-of-00001.parquet", "Rowan/hellaswag/data/validation-00000-of-00001.parquet")
    copy("obqa/main/test-00000-of-00001.parquet", "openbookqa/main/test-00000-of-00001.parquet")
    wino = [json.loads(line) for line in open(f"{ref}/winogrande/dev.jsonl")]
    write_parquet(f"{d}/winogrande/winogrande_xl/validation-00000-of-00001.parquet", wino)
    # Train splits beside them are not read.
    write_parquet(f"{d}/ai2_arc/ARC-Easy/train-00000-of-00001.parquet", [{"question": "not this"}])
    write_parquet(f"{d}/Salesforce/wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet", [{"text": " = A = \n"}])

    check_task_files(list(TASKS), d)
    for name in TASKS:
        assert load_task(name, d) == expected[name], name
    assert find_wikitext(d).endswith("Salesforce/wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet")


def test_every_missing_task_is_reported_at_once_with_near_misses(tmp_path):
    d = str(tmp_path)
    write_parquet(f"{d}/super_glue/boolq/train-00000-of-00001.parquet", [{"question": "q"}])  # wrong split
    write_parquet(f"{d}/ARC-Easy/test-00000-of-00001.parquet", [{"question": "q"}])  # missing a folder level
    write_task_data(tmp_path / "ok", n=1)
    os.rename(f"{d}/ok/winogrande", f"{d}/winogrande")
    with pytest.raises(TaskDataError) as e:
        check_task_files(list(TASKS), d)
    message = str(e.value)
    assert message.startswith(f"7 of 8 tasks have no data under {d}")
    for name in TASKS:
        assert (f"{name}: no data found" in message) == (name != "winogrande"), name
    boolq = message[message.index("boolq: no data found"):message.index("piqa: no data found")]
    assert f"{d}/super_glue/: boolq/validation-*.parquet" in boolq  # the accepted layout, spelled out
    assert f"{d}/super_glue/boolq/train-00000-of-00001.parquet" in boolq  # the near miss, named
    arc = message[message.index("arc_easy: no data found"):message.index("arc_challenge: no data found")]
    assert f"{d}/ARC-Easy/test-00000-of-00001.parquet" in arc and "train-" not in arc
    with pytest.raises(TaskDataError, match="wikitext: no WikiText-2"):
        find_wikitext(d)


def test_malformed_records_name_the_file_and_record(tmp_path):
    write_parquet(f"{tmp_path}/boolq/validation-0.parquet", [{"question": "q", "passage": "p"}])
    with pytest.raises(TaskDataError, match=r"validation-0\.parquet row 0: missing field 'answer'"):
        load_task("boolq", str(tmp_path))
    write_jsonl(f"{tmp_path}/arc_easy/ARC-Easy-Test.jsonl", [
        {"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"},
        {"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "E"},
    ])
    with pytest.raises(TaskDataError, match=r"ARC-Easy-Test\.jsonl:2: answerKey 'E'"):
        load_task("arc_easy", str(tmp_path))
    with open(f"{tmp_path}/arc_easy/ARC-Easy-Test.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(TaskDataError, match=r"ARC-Easy-Test\.jsonl:3: invalid JSON"):
        load_task("arc_easy", str(tmp_path))


# --- Scoring --------------------------------------------------------------------------------------


def test_encode_pair_moves_trailing_spaces_and_prepends_bos():
    tok = CharTokenizer()
    context, continuation = encode_pair(tok, "Answer: ", "yes")
    assert context == [1] + tok.encode("Answer:") and continuation == tok.encode(" yes")
    context, continuation = encode_pair(tok, "Answer:", " yes", add_bos=False)
    assert context == tok.encode("Answer:") and continuation == tok.encode(" yes")
    assert encode_pair(tok, "", "ab", add_bos=False) == ([tok.eos_id], tok.encode("ab"))


def test_encode_pair_with_sentencepiece_splits_the_joint_encoding(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model_path = str(tmp_path / "sp")
    lines = ["Question: which dog runs fastest?", "Answer: the brown dog runs fast.", "yes no maybe"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=model_path, model_type="bpe",
                                   vocab_size=60, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    from mobilellm_train.evaluation.loading import Tokenizer

    tok = Tokenizer(model_path + ".model")
    context, continuation = encode_pair(tok, "Question: which dog?\nAnswer:", " the brown dog")
    assert context[0] == tok.bos_id
    assert context[1:] + continuation == tok.encode("Question: which dog?\nAnswer: the brown dog")
    assert tok.decode(continuation) == "the brown dog"  # the piece's leading space is the delimiter


def test_continuation_logprobs_sum_every_continuation_token():
    torch.manual_seed(0)
    model = BigramModel(torch.randn(VOCAB, VOCAB))
    tok = CharTokenizer()
    texts = [("Q: abc\nA:", " x"), ("Question:", " a much longer answer"), ("z", " yy"), ("Hi", "!"), ("", "solo")]
    pairs = [encode_pair(tok, c, t) for c, t in texts]
    expected = [bigram_logprob(model, ctx[-1:] + cont) for ctx, cont in pairs]
    for batch_size, pad in [(1, 1), (2, 16), (8, 7)]:
        got = continuation_logprobs(model, pairs, batch_size, max_seq_len=64, pad_to_multiple=pad)
        assert got == pytest.approx(expected, abs=1e-4)


def test_batched_scoring_of_a_real_model_equals_one_request_at_a_time(tmp_path):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB, max_seq_len=24)
    model = MobileLLM(args)
    model.init_weights(seed=1)
    model.eval()
    tok = CharTokenizer()
    # The second context is longer than max_seq_len, so it is cut from the left.
    texts = [("Question: ab", " cd"), ("x" * 40 + " long context", " tail"), ("Q", " a b c d e f")]
    pairs = [encode_pair(tok, c, t) for c, t in texts]
    expected = []
    with torch.no_grad():
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(args.max_seq_len + 1):]
            logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0], dim=-1)
            n = len(seq) - 1
            expected.append(sum(logp[n - len(cont) + j, cont[j]].item() for j in range(len(cont))))
    got = continuation_logprobs(model, pairs, batch_size=3, max_seq_len=args.max_seq_len, pad_to_multiple=16)
    assert got == pytest.approx(expected, abs=1e-4)


def test_acc_norm_divides_by_the_choice_length_in_characters():
    # Uniform logits: every token costs log(VOCAB), so the longer choice has the lower total
    # but the higher score per character.
    model = BigramModel(torch.zeros(VOCAB, VOCAB))
    example = Example(requests=(("Answer:", " a"), ("Answer:", " abcd")), choices=("a", "abcd"), gold=1)
    correct, correct_norm, total = score_examples(model, CharTokenizer(), [example])
    assert (correct, correct_norm, total) == (0, 1, 1)
    scores = [-2 * math.log(VOCAB), -5 * math.log(VOCAB)]
    assert choose(scores) == 0 and choose(scores, [1, 4]) == 1
    assert choose([-1.0, -1.0, -3.0]) == 0  # ties go to the first, as numpy's argmax


def test_evaluate_tasks_picks_the_pattern_continuing_choice(tmp_path):
    data = write_task_data(tmp_path, n=5)
    model = alphabet_model()
    model.train()
    results = evaluate_tasks(model, CharTokenizer(), list(TASKS), data, batch_size=4)
    assert model.training  # restored
    for name, r in results.items():
        assert (r.acc, r.num_examples) == (1.0, 5), name
        if name != "winogrande":
            assert r.acc_norm == 1.0, name
    # A model that prefers the alphabet backwards gets them wrong: gold indices are really used.
    backwards = BigramModel(alphabet_model().table.detach().T.contiguous())
    wrong = evaluate_tasks(backwards, CharTokenizer(), ["arc_easy", "siqa", "piqa"], data, max_examples_per_task=4)
    assert all(r.acc == 0.0 and r.num_examples == 4 for r in wrong.values())


# --- Perplexity ---------------------------------------------------------------------------------


def test_wikitext_rows_windows_and_a_uniform_model(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Some text here . \n")
    rows = read_wikitext_rows(str(raw))
    assert rows == ["", " = Title = \n", "", " Some text here . \n"]
    write_parquet(str(tmp_path / "test-0.parquet"), [{"text": r} for r in rows])
    assert read_wikitext_rows(str(tmp_path / "test-0.parquet")) == rows
    tok = CharTokenizer()
    windows = wikitext_windows(rows, tok, seq_len=8)
    ids = [1] + tok.encode("\n\n".join(rows))
    assert windows.shape == (len(ids) // 8, 8) and windows.flatten().tolist() == ids[: windows.numel()]
    result = evaluate_perplexity(BigramModel(torch.zeros(VOCAB, VOCAB)), windows, batch_size=3)
    assert result.num_tokens == windows.shape[0] * 7  # the first token of a window is not predicted
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    with pytest.raises(TaskDataError, match="column 'text'"):
        write_parquet(str(tmp_path / "bad.parquet"), [{"line": "x"}])
        read_wikitext_rows(str(tmp_path / "bad.parquet"))


def test_token_windows_are_the_trainers_windows(tmp_path):
    data = tmp_path / "tokens"
    docs = [[1] + list(range(3, 3 + n)) + [2] for n in (5, 17, 3, 30, 11)]
    write_jsonl(str(data / "1" / "part-0.jsonl"), [{"token_ids": d} for d in docs])
    windows = pack_windows(jsonl_documents(str(data), vocab_size=64), window_len=9)
    dataset = JsonlTokenDataset(str(data), seq_len=8, vocab_size=64, dp_rank=0, dp_world_size=1, ranks_per_node=1)
    trainer = [torch.cat([s["input"], s["label"][-1:]]) for _, s in zip(range(len(windows)), dataset)]
    assert torch.equal(windows, torch.stack(trainer))
    assert len(pack_windows(jsonl_documents(str(data), vocab_size=64), 9, max_windows=2)) == 2
    # A prepared shard dataset of the same documents is the same token stream.
    from mobilellm_train.data.shards import write_token_dataset

    write_token_dataset(str(tmp_path / "shards"), [np.array(d) for d in docs], vocab_size=64, tokens_per_shard=20)
    assert torch.equal(pack_windows(token_documents(str(tmp_path / "shards"), 64), 9), windows)
    assert torch.equal(pack_windows(shard_tokens(str(tmp_path / "shards"), 64, chunk_tokens=7), 9), windows)
    assert torch.equal(pack_windows(token_documents(str(data), 64), 9), windows)
    with pytest.raises(DataError, match="token ids up to 32, beyond the model's vocab_size 20"):
        next(token_documents(str(tmp_path / "shards"), 20))
    with open(data / "1" / "part-0.jsonl", "a") as f:
        f.write('{"token_ids": [1, 99]}\n')
    with pytest.raises(DataError, match=r"part-0\.jsonl:6: token id 99 outside"):
        list(jsonl_documents(str(data), vocab_size=64))


# --- Report -------------------------------------------------------------------------------------


def test_table_layout_average_and_scalars():
    full = {t: TaskResult(t, 0.5, 0.25, 10) for t in TASKS}
    table = format_table({"ours": {t: 100 * r.score for t, r in full.items()}}, reference=("MobileLLM-125M",))
    lines = table.splitlines()
    assert lines[0] == "| model | arc_easy | arc_challenge | boolq | piqa | siqa | hellaswag | obqa | winogrande | avg |"
    # acc_norm (25%) for arc_easy, arc_challenge, piqa, hellaswag, obqa; acc (50%) for the rest.
    assert lines[2] == "| ours | 25.0 | 25.0 | 50.0 | 25.0 | 50.0 | 25.0 | 25.0 | 50.0 | 34.4 |"
    assert lines[3].startswith("| MobileLLM-125M (paper) | 43.9 | 27.1 |") and lines[3].endswith("| 46.3 |")
    partial = format_table({"few": {"boolq": 61.0}})
    assert partial.splitlines()[2] == "| few | - | - | 61.0 | - | - | - | - | - | - |"
    scalars = results_to_scalars(full)
    assert scalars["eval/boolq"] == 50.0 and scalars["eval/piqa_acc"] == 0.5
    assert scalars["eval/avg"] == pytest.approx(34.375)
    # The paper rows are transcribed whole: each averages to the README's avg (docs/REFERENCE.md), to its rounding.
    paper_avg = {"MobileLLM-125M": 46.3, "MobileLLM-LS-125M": 47.0, "MobileLLM-350M": 51.3,
                 "MobileLLM-LS-350M": 52.1, "MobileLLM-600M": 54.3, "MobileLLM-1B": 57.3, "MobileLLM-1.5B": 59.4}
    assert set(PAPER_RESULTS) == set(paper_avg)
    for name, row in PAPER_RESULTS.items():
        assert len(row) == 8 and sum(row) / 8 == pytest.approx(paper_avg[name], abs=0.051), name


# --- The CLI and distributed evaluation ---------------------------------------------------------


def _tiny_hf_folder(tmp_path):
    """A random MobileLLM with a SentencePiece tokenizer, exported as an HF folder."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("safetensors")
    from mobilellm_train.export import write_hf_folder

    prefix = str(tmp_path / "sp")
    lines = [f"Question: which one {i}? Answer: cdefg mnopq qzkx. Put xyz abcd" for i in range(40)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, model_type="bpe",
                                   vocab_size=80, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=96, max_seq_len=64)
    model = MobileLLM(args)
    model.init_weights(seed=0)
    return write_hf_folder(args, model.state_dict(), str(tmp_path / "hf"), tokenizer_path=prefix + ".model")


def run_cli(args, expect_rc=0):
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "mobilellm_train.evaluation.cli", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == expect_rc, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json(tmp_path):
    hf = _tiny_hf_folder(tmp_path)
    data = write_task_data(tmp_path / "data", n=3)
    os.makedirs(f"{data}/wikitext")
    (tmp_path / "data" / "wikitext" / "wiki.test.raw").write_text(" = Title = \n\n Which one ? cdefg . \n" * 20)
    tokens = make_corpus(tmp_path / "tokens", n_docs=40)
    out = tmp_path / "results.json"
    r = run_cli(["--checkpoint", hf, "--names", "tiny", "--tasks", "all,tokens", "--data-dir", data,
                 "--token-data", tokens, "--max-windows", "7", "--seq-len", "32", "--reference", "MobileLLM-125M",
                 "--out", str(out), "--device", "cpu"])
    assert "| model | arc_easy |" in r.stdout and "| tiny |" in r.stdout and "MobileLLM-125M (paper)" in r.stdout
    assert "tiny: wikitext perplexity" in r.stdout
    report = json.loads(out.read_text())
    model = report["models"]["tiny"]
    assert set(model["tasks"]) == set(TASKS) and model["average"] is not None
    assert all(t["num_examples"] == 3 and 0 <= t["acc"] <= 1 for t in model["tasks"].values())
    assert model["tasks"]["boolq"]["metric"] == "acc" and model["tasks"]["hellaswag"]["metric"] == "acc_norm"
    assert model["perplexity"]["wikitext"]["perplexity"] > 1 and model["perplexity"]["wikitext"]["seq_len"] == 32
    assert model["perplexity"]["tokens"]["num_windows"] == 7 and model["perplexity"]["tokens"]["num_tokens"] == 7 * 32
    # Nothing is overwritten, and missing data is reported before any model is loaded.
    r = run_cli(["--checkpoint", hf, "--tasks", "boolq", "--data-dir", data, "--out", str(out)], expect_rc=1)
    assert "exists" in r.stderr
    r = run_cli(["--checkpoint", str(tmp_path / "nowhere"), "--tasks", "boolq,obqa", "--data-dir", str(tmp_path)],
                expect_rc=1)
    assert "boolq: no data found" in r.stderr and "data/validation-*.parquet" in r.stderr


# Self-contained (no import of this module): the ranks load only torch and the package.
FSDP_SCRIPT = """
import json, os, string, sys
import torch, torch.distributed as dist
from mobilellm_train.config import ParallelismConfig
from mobilellm_train.evaluation.perplexity import evaluate_perplexity
from mobilellm_train.evaluation.scoring import evaluate_tasks
from mobilellm_train.model import MobileLLM, ModelArgs
from mobilellm_train.parallelize import apply_fsdp, build_mesh

class CharTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [3 + string.printable.index(c) for c in text]


dist.init_process_group("gloo")
with torch.device("meta"):
    model = MobileLLM(ModelArgs(**{args!r}))
apply_fsdp(model, build_mesh("cpu", dist.get_world_size(), 1), ParallelismConfig(), torch.float32, torch.float32)
model.to_empty(device="cpu")
model.init_weights(seed=0)
results = evaluate_tasks(model, CharTokenizer(), {tasks!r}, {data!r}, batch_size=2)
ppl = evaluate_perplexity(model, torch.load({windows!r}), batch_size=2)
if dist.get_rank() == 0:
    json.dump({{"tasks": {{k: [r.acc, r.acc_norm, r.num_examples] for k, r in results.items()}},
               "ppl": [ppl.nll_sum, ppl.num_tokens]}}, open({out!r}, "w"))
dist.destroy_process_group()
# Skip C++ teardown: a gloo run here aborted at exit, after all work ("terminate called without
# an active exception", no Python frame) about once in fifty runs on a loaded 2-core machine.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_evaluate_tasks_on_two_fsdp_ranks_equals_one_process(tmp_path):
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB, max_seq_len=128)
    data = write_task_data(tmp_path / "data", n=5)  # odd: one rank has an extra example to pad
    tasks = ["arc_easy", "winogrande", "siqa"]
    windows = torch.randint(3, VOCAB, (5, 17))
    torch.save(windows, tmp_path / "windows.pt")
    script = tmp_path / "run.py"
    script.write_text(FSDP_SCRIPT.format(args=args, tasks=tasks, data=data,
                                         windows=str(tmp_path / "windows.pt"), out=str(tmp_path / "out.json")))
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())

    model = MobileLLM(ModelArgs(**args))
    model.init_weights(seed=0)
    single = evaluate_tasks(model, CharTokenizer(), tasks, data, batch_size=3)
    for name, r1 in single.items():
        assert got["tasks"][name] == [r1.acc, r1.acc_norm, 5], name
    ppl = evaluate_perplexity(model, windows, batch_size=4)
    assert got["ppl"][1] == ppl.num_tokens == 5 * 16
    assert got["ppl"][0] == pytest.approx(ppl.nll_sum, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scoring_on_cuda_matches_cpu():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB, max_seq_len=64)
    model = MobileLLM(args)
    model.init_weights(seed=1)
    model.eval()
    tok = CharTokenizer()
    pairs = [encode_pair(tok, c, t) for c, t in [("Question: ab", " cd"), ("Q", " a b c d e f"), ("xyz", " w")]]
    expected = continuation_logprobs(model, pairs, batch_size=2, max_seq_len=64)
    model.cuda()
    assert continuation_logprobs(model, pairs, batch_size=2, max_seq_len=64) == pytest.approx(expected, abs=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = continuation_logprobs(model, pairs, batch_size=2, max_seq_len=64)
    assert bf16 == pytest.approx(expected, abs=0.2)
