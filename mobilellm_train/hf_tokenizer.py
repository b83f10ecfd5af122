"""A Hugging Face `tokenizer.json` that reproduces a SentencePiece model id for id.

transformers' own conversion of a SentencePiece `tokenizer.model` (LlamaTokenizer's Metaspace
pre-tokenizer, or the slow converter) assumes Llama-2's exact settings; on the tokenizers that
`mobilellm-prepare tokenizer` trains it gives other ids for text with leading or repeated spaces
(`" apple"`, `"  two"`), and for every unigram model. This module reads the SentencePiece model file
itself and writes a `tokenizers` pipeline with SentencePiece's semantics:

- normalizer: SentencePiece's normalization (identity, or its precompiled NFKC charsmap), extra
  whitespace removal when the model does it, spaces escaped as U+2581 and the dummy prefix added
  to the whole text (SentencePiece encodes the whole text as one sequence, so there is no
  pre-tokenizer: a piece of several spaces may follow any piece);
- model: BPE (merges in SentencePiece's score order) or Unigram (the piece scores), unknown text
  as UTF-8 byte pieces when the model was trained with byte fallback, else as the unknown piece;
- decoder: U+2581 back to spaces, byte pieces back to UTF-8, the dummy prefix removed;
- post-processor: BOS before the text (as the trainer's data), no EOS.

`read_sentencepiece_model` parses the model's protobuf directly (a few fields), so no protobuf
package is needed. Features a `tokenizer.json` cannot express exactly (user-defined symbols,
WORD/CHAR models, whitespace as suffix) raise `UnsupportedTokenizer`.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

SPACE = "\u2581"  # SentencePiece's escaped space

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}


class UnsupportedTokenizer(ValueError):
    """The SentencePiece model uses a feature a tokenizer.json cannot reproduce exactly."""


@dataclass
class SentencePieceModel:
    """The fields of a SentencePiece ModelProto that decide how text becomes ids."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message; values are int or bytes."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end:
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n = varint()
            if pos + n > end:
                raise ValueError("truncated field")
            yield number, wire, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            yield number, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unknown wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def read_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """Parse a SentencePiece `.model` file's bytes (ModelProto); ValueError if it is not one."""
    m = SentencePieceModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # pieces
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            m.pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:  # trainer_spec
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    m.model_type = v
                elif n == 24 and w == 0:
                    m.treat_whitespace_as_suffix = bool(v)
                elif n == 35 and w == 0:
                    m.byte_fallback = bool(v)
        elif number == 3 and wire == 2:  # normalizer_spec
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    m.normalizer_name = v.decode("utf-8")
                elif n == 2 and w == 2:
                    m.precompiled_charsmap = bytes(v)
                elif n == 3 and w == 0:
                    m.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    m.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    m.escape_whitespaces = bool(v)
    if not m.pieces:
        raise ValueError("no pieces")
    return m


def _check_supported(m: SentencePieceModel) -> None:
    if m.model_type not in (BPE, UNIGRAM):
        raise UnsupportedTokenizer(f"a {MODEL_TYPE_NAMES.get(m.model_type, m.model_type)} model "
                                   "(only bpe and unigram are reproduced)")
    if any(kind == USER_DEFINED for _, _, kind in m.pieces):
        raise UnsupportedTokenizer("user-defined symbols")
    if m.treat_whitespace_as_suffix:
        raise UnsupportedTokenizer("treat_whitespace_as_suffix")
    if not m.escape_whitespaces:
        raise UnsupportedTokenizer("escape_whitespaces=false")


def _normalizer(m: SentencePieceModel) -> dict | None:
    steps = []
    if m.precompiled_charsmap:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(m.precompiled_charsmap).decode("ascii")})
    if m.remove_extra_whitespaces:
        # SentencePiece drops leading and trailing spaces and folds runs of spaces into one (spaces
        # only: tabs and newlines are kept unless the charsmap maps them to spaces).
        steps.append({"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""})
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    if m.add_dummy_prefix:
        # Prepend leaves an empty text empty, as SentencePiece does.
        steps.append({"type": "Prepend", "prepend": SPACE})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    return {"type": "Sequence", "normalizers": steps}


def _bpe_merges(m: SentencePieceModel, vocab: dict[str, int]) -> list[list[str]]:
    """Every split of every mergeable piece into two pieces, in SentencePiece's merge order.

    SentencePiece's BPE merges the adjacent pair whose concatenation has the highest score; a
    merge list ranked by the merged piece's score (then by id) makes `tokenizers` do the same.
    Unused pieces take part in merging too (SentencePiece splits them again afterwards, which a
    model trained by prepare never needs: it has none).
    """
    mergeable = {p: (score, i) for i, (p, score, kind) in enumerate(m.pieces) if kind in (NORMAL, UNUSED)}
    merges = []
    for piece, (score, i) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [[left, right] for *_, left, right in merges]


def build_tokenizer_json(model_bytes: bytes, bos_id: int) -> dict:
    """The tokenizer.json content (a dict) reproducing the SentencePiece model in `model_bytes`,
    with the piece `bos_id` (the model's BOS; -1 for none) put before every text."""
    m = read_sentencepiece_model(model_bytes)
    _check_supported(m)
    unk_id = next((i for i, (_, _, kind) in enumerate(m.pieces) if kind == UNKNOWN), None)
    added = [
        {"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (p, _, kind) in enumerate(m.pieces) if kind == CONTROL
    ]
    if m.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(m.pieces)}
        model = {
            "type": "BPE", "dropout": None,
            "unk_token": m.pieces[unk_id][0] if unk_id is not None else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            # SentencePiece writes a run of unknown characters as one unknown piece.
            "fuse_unk": True, "byte_fallback": m.byte_fallback, "ignore_merges": False,
            "vocab": vocab, "merges": _bpe_merges(m, vocab),
        }
    else:
        # SentencePiece's Viterbi search sees only normal pieces; `tokenizers` matches every
        # vocabulary entry against the text, so "<s>" or "<0x41>" written in the text would become
        # one control or byte piece (their stored score is 0, the best there is). Scored far below
        # any spelling with normal pieces they are never chosen. That lowers the unknown-piece
        # score too (the lowest score less 10, in both libraries), which changes no result: a
        # character outside the vocabulary is in no piece, so every segmentation pays it alike.
        # The one case left: such a name written in a text where one of its characters is
        # outside the vocabulary ("<s>" with no "<" piece) is still matched as that piece, since
        # an unknown character always scores below every piece.
        floor = min(score for _, score, kind in m.pieces if kind == NORMAL) - 1000.0
        model = {
            "type": "Unigram", "unk_id": unk_id, "byte_fallback": m.byte_fallback,
            "vocab": [[p, score if kind in (NORMAL, UNUSED) else floor] for p, score, kind in m.pieces],
        }
    post = None
    if 0 <= bos_id < len(m.pieces):
        bos = m.pieces[bos_id][0]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    decoders = []
    if unk_id is not None:
        # SentencePiece decodes the unknown piece as " \u2047 " (its unk_surface); it is not an
        # added token, so skip_special_tokens keeps it as SentencePiece does.
        decoders.append({"type": "Replace", "pattern": {"String": m.pieces[unk_id][0]}, "content": " \u2047 "})
    decoders += [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if m.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _normalizer(m),
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }
