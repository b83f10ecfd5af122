"""Tests of the exported tokenizer (hf_tokenizer.py via export.write_hf_folder): transformers'
AutoTokenizer, loading the exported folder, gives SentencePiece's ids and SentencePiece's text back,
for the tokenizers `mobilellm-prepare tokenizer` trains (BPE and unigram, with and without byte
fallback) and a SentencePiece-default (NFKC) one, on text with leading, repeated and trailing
spaces, tabs, newlines, accents, CJK, emoji, characters outside the vocabulary and literal "<s>";
features transformers cannot reproduce are refused by name."""

import json
import os
import random

import pytest

from conftest import init_model
from mobilellm_train.data import prepare
from mobilellm_train.export import ExportError, write_hf_folder
from mobilellm_train.hf_tokenizer import BPE, UNIGRAM, read_sentencepiece_model
from mobilellm_train.model import ModelArgs

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=700, max_seq_len=64)

WORDS = ("the quick brown fox jumps over lazy dog apple banana two leading spaces model training data "
         "café naïve résumé über straße 日本語 中文 テキスト 😀 42 3.14 def return x = f(y) <b>html</b> a<b 0x41 _"
         ).split()

CASES = [
    "hello world", " apple", "  two leading spaces", "trailing spaces   ", "a  b   c    d", " ", "  ", "",
    "\tTab\tseparated\t", "line one\nline two\n\nline four\n", "\n leading newline", "mixed \t \n whitespace ",
    "Café naïve résumé", "日本語のテキスト", "中文 和 English", "emoji 😀🎉 end", "Ωmega ψ ж", "über  straße  ",
    "outside the vocabulary: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b ꙮ", "control\x01char", "digits 1234567890 and 3.14159",
    "<s> literal </s> <unk> <0x41>", "\u2581already escaped\u2581\u2581", "def f(x):\n    return x  # why\n",
    "ﬁligree Ⅸ ｆｕｌｌｗｉｄｔｈ", "a\r\nb",
]


def fuzz_texts(n=400, seed=0):
    """Random strings over whitespace, words, non-ASCII and unknown characters."""
    rng = random.Random(seed)
    alphabet = list("  \t\n\r abcxyz.,-_éü日本😀𝔘ꙮ") + ["the ", " apple", "  ", "<s>", "\u2581", "ﬁ"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    # Made-up words as well, so that a unigram model finds 450 pieces worth keeping.
    syllables = ["ka", "to", "ri", "mé", "su", "lo", "ne", "da", "pi", "gu", "zhe", "日", "ö"]
    words = list(WORDS) + ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(300)]
    folder = tmp_path_factory.mktemp("raw")
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(400):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3)]
            f.write(json.dumps({"text": "\n".join(lines) + "  "}) + "\n")
    return str(folder)


def prepare_tokenizer(corpus, out, model_type, byte_fallback):
    # Without byte fallback the 256 byte pieces are missing, and so is room for 450 pieces.
    vocab_size = "450" if byte_fallback else "300"
    prepare.run(["tokenizer", "--input", corpus, "--out", str(out), "--vocab-size", vocab_size, "--workers", "1",
                 "--model-type", model_type, "--byte-fallback" if byte_fallback else "--no-byte-fallback"])
    return str(out)


def export_tokenizer(tmp_path, tokenizer_path):
    out = write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "exported"),
                          tokenizer_path=tokenizer_path)
    return transformers.AutoTokenizer.from_pretrained(out), out


def assert_same_as_sentencepiece(hf_tok, tokenizer_path, unigram=False):
    """Ids equal SentencePiece's, and decoding gives SentencePiece's text. A unigram model may
    split a tie differently: SentencePiece sums piece scores in float32, whose rounding picks one
    of two equally scored segmentations ("▁▁" + "▁" or "▁" + "▁▁"); any difference must be such a
    tie, the same text at the same total score."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ties = 0
    for text in CASES + fuzz_texts():
        ids = [sp.bos_id()] + sp.encode(text)
        hf_ids = hf_tok(text)["input_ids"]
        if hf_ids != ids and unigram:
            ties += 1
            assert sp.decode(hf_ids) == sp.decode(ids), f"encode {text!r}"
            total = sum(map(sp.get_score, hf_ids)), sum(map(sp.get_score, ids))
            assert total[0] == pytest.approx(total[1], rel=1e-5), f"encode {text!r}"
        else:
            assert hf_ids == ids, f"encode {text!r}"
        assert hf_tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), f"decode {text!r}"
    assert ties <= len(CASES) // 10  # ties are rare, not the rule


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("byte_fallback", [True, False])
def test_transformers_reproduces_prepared_tokenizers(tmp_path, corpus, model_type, byte_fallback):
    path = prepare_tokenizer(corpus, tmp_path / "tok.model", model_type, byte_fallback)
    model = read_sentencepiece_model(open(path, "rb").read())
    assert model.model_type == {"bpe": BPE, "unigram": UNIGRAM}[model_type]
    assert model.byte_fallback == byte_fallback and not model.remove_extra_whitespaces
    hf_tok, out = export_tokenizer(tmp_path, path)
    assert sorted(f for f in os.listdir(out) if "token" in f) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert_same_as_sentencepiece(hf_tok, path, unigram=model_type == "unigram")
    # The examples, spelled out: transformers used to give other ids for these.
    sp = spm.SentencePieceProcessor(model_file=path)
    for text in ("  two leading spaces", " apple"):
        assert hf_tok.encode(text) == [1] + sp.encode(text)
        assert hf_tok.decode(hf_tok.encode(text), skip_special_tokens=True) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
    # "<s>" in the text is text, as in the training data; only the BOS in front is id 1.
    assert hf_tok.encode("<s>").count(1) == 1


def test_sentencepiece_defaults_nfkc_and_whitespace_folding(tmp_path, corpus):
    # Not what prepare trains, but a common tokenizer.model: NFKC, extra whitespace removed.
    lines = [json.loads(line)["text"] for line in open(os.path.join(corpus, "docs.jsonl"), encoding="utf-8")]
    lines += ["ﬁligree Ⅸ ｆｕｌｌｗｉｄｔｈ"] * 3
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "nfkc"),
                                   vocab_size=500, byte_fallback=True, minloglevel=2, num_threads=1)
    path = str(tmp_path / "nfkc.model")
    model = read_sentencepiece_model(open(path, "rb").read())
    assert model.precompiled_charsmap and model.remove_extra_whitespaces
    hf_tok, _ = export_tokenizer(tmp_path, path)
    assert_same_as_sentencepiece(hf_tok, path, unigram=True)


def test_unreproducible_tokenizer_is_refused_by_name(tmp_path, corpus):
    lines = [json.loads(line)["text"] for line in open(os.path.join(corpus, "docs.jsonl"), encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uds"),
                                   vocab_size=300, user_defined_symbols=["<tool>"], minloglevel=2, num_threads=1)
    with pytest.raises(ExportError, match="user-defined symbols.*--no-tokenizer"):
        write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "out"),
                        tokenizer_path=str(tmp_path / "uds.model"))
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "junk.model").write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(ExportError, match="junk.model: not a SentencePiece model"):
        write_hf_folder(ARGS, init_model(ARGS).state_dict(), str(tmp_path / "out"),
                        tokenizer_path=str(tmp_path / "junk.model"))


def test_export_cli_refuses_an_unreproducible_tokenizer_before_loading_and_no_tokenizer_skips_it(tmp_path, corpus):
    import subprocess
    import sys

    from conftest import subprocess_env

    lines = [json.loads(line)["text"] for line in open(os.path.join(corpus, "docs.jsonl"), encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uds"),
                                   vocab_size=300, user_defined_symbols=["<tool>"], minloglevel=2, num_threads=1)
    # The checkpoint folder does not exist: the tokenizer is refused first, before any load.
    cmd = [sys.executable, "-m", "mobilellm_train.export", "--checkpoint", str(tmp_path / "no-step"),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd + ["--tokenizer", str(tmp_path / "uds.model")], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 1 and "user-defined symbols" in r.stderr and "--no-tokenizer" in r.stderr
    r = subprocess.run(cmd + ["--tokenizer", str(tmp_path / "uds.model"), "--no-tokenizer"], capture_output=True,
                       text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2 and "contradict" in r.stderr
    assert not os.path.exists(tmp_path / "out")
