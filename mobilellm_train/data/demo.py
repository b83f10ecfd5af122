"""The built-in demo corpus: a tokenizer and JSONL data made from text every Python install has.

The text is the docstrings of the Python standard library (one document per module), so a fresh
machine can train end to end with no download. ``build_demo_corpus`` trains a small SentencePiece
BPE model on it (Llama-2 style ids: unk 0, bos 1, eos 2, byte fallback) and writes the original
data layout, one folder, so any number of data-parallel ranks can read it::

    out_dir/tokenizer.model
    out_dir/data/1/part-00000.jsonl   {"token_ids": [1, ..., 2]} per document
    out_dir/val/1/part-00000.jsonl    the last ~2% of documents, held out
    out_dir/DONE.json                 written last; a matching one makes a rebuild a no-op

Run it by hand with ``python -m mobilellm_train.data.demo OUT_DIR [VOCAB_SIZE]``.
"""

import ast
import io
import json
import logging
import os
import sys
import sysconfig
import time

import sentencepiece as spm

from mobilellm_train.errors import parse_json
from mobilellm_train.run_files import check_not_link, open_run_file, read_run_file

logger = logging.getLogger(__name__)

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_VAL_FRACTION = 0.02
_BOS_ID, _EOS_ID = 1, 2


def _docstrings_in_source_order(tree: ast.Module) -> list[str]:
    docs = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return docs


def _stdlib_documents(max_text_bytes: int) -> list[str]:
    """Each stdlib module's docstrings joined, in sorted path order, at most max_text_bytes of UTF-8."""
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    total_bytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order, which is what makes the corpus deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError):
                continue  # e.g. deliberately broken files shipped as test fixtures
            parts = _docstrings_in_source_order(tree)
            if not parts:
                continue
            doc = "\n\n".join(parts)
            room = max_text_bytes - total_bytes
            encoded = doc.encode("utf-8")
            if len(encoded) >= room:
                # Cut on a character boundary so the cap is exact and the text stays valid UTF-8.
                doc = encoded[:room].decode("utf-8", errors="ignore")
                if doc:
                    docs.append(doc)
                return docs
            docs.append(doc)
            total_bytes += len(encoded)
    return docs


def _train_tokenizer(docs: list[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model trained on the docs' lines."""
    sentences = [line for doc in docs for line in doc.split("\n") if line.strip()]
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=_BOS_ID,
        eos_id=_EOS_ID,
        pad_id=-1,
        # Llama-2 style: keep whitespace and newlines as they are (newlines via byte fallback),
        # so decode(encode(doc)) == doc.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def _write_atomic(path: str, data: bytes, out_dir: str) -> None:
    """Write `path` whole, never through a link: no folder between out_dir and it may be one (a
    run's demo_data/ may come with a run folder from elsewhere), and the data goes to a temporary
    created exclusively, then renamed over `path` (which replaces a link there, not its target)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    while folder.startswith(out_dir + os.sep):
        check_not_link(folder)
        folder = os.path.dirname(folder)
    tmp = f"{path}.tmp.{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    with open_run_file(tmp, "xb") as f:
        f.write(data)
    os.replace(tmp, path)


def _jsonl_bytes(documents: list[list[int]]) -> bytes:
    return "".join(json.dumps({"token_ids": ids}) + "\n" for ids in documents).encode("utf-8")


def build_demo_corpus(
    out_dir: str, vocab_size: int = 2000, max_text_bytes: int = 3_000_000
) -> tuple[str, str]:
    """Build (or find already built) the demo corpus in out_dir; returns (data_path, tokenizer_model_path)."""
    out_dir = os.path.abspath(out_dir)
    data_path = os.path.join(out_dir, "data")
    model_path = os.path.join(out_dir, "tokenizer.model")
    train_file = os.path.join(data_path, "1", "part-00000.jsonl")
    val_file = os.path.join(out_dir, "val", "1", "part-00000.jsonl")
    done_path = os.path.join(out_dir, "DONE.json")

    if os.path.lexists(done_path):
        try:
            done = parse_json(read_run_file(done_path) or b"")
        except ValueError:  # damaged: rebuilt below
            done = None
        done = done if isinstance(done, dict) else {}
        same_params = done.get("vocab_size") == vocab_size and done.get("max_text_bytes") == max_text_bytes
        if same_params and all(os.path.exists(p) for p in (model_path, train_file, val_file)):
            logger.info("demo corpus already built in %s", out_dir)
            return data_path, model_path
        # A rebuild that dies halfway must not leave a DONE.json vouching for mixed files.
        os.remove(done_path)

    start = time.perf_counter()
    stdlib = sysconfig.get_paths()["stdlib"]
    logger.info("building demo corpus in %s from the docstrings of %s", out_dir, stdlib)
    docs = _stdlib_documents(max_text_bytes)
    if len(docs) < 2:
        raise RuntimeError(
            f"only {len(docs)} documents of stdlib docstrings within {max_text_bytes} bytes; "
            f"raise max_text_bytes"
        )
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    model_proto = _train_tokenizer(docs, vocab_size)
    _write_atomic(model_path, model_proto, out_dir)

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    encoded = [[_BOS_ID, *ids, _EOS_ID] for ids in sp.encode(docs)]
    num_val = max(1, round(len(encoded) * _VAL_FRACTION))
    train_docs, val_docs = encoded[:-num_val], encoded[-num_val:]
    _write_atomic(train_file, _jsonl_bytes(train_docs), out_dir)
    _write_atomic(val_file, _jsonl_bytes(val_docs), out_dir)

    seconds = time.perf_counter() - start
    done = {
        "vocab_size": vocab_size,
        "max_text_bytes": max_text_bytes,
        "text_bytes": text_bytes,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": sum(map(len, train_docs)), "val": sum(map(len, val_docs))},
        "python": sys.version.split()[0],
        "build_seconds": round(seconds, 2),
    }
    _write_atomic(done_path, (json.dumps(done, indent=2) + "\n").encode("utf-8"), out_dir)
    logger.info(
        "demo corpus built in %.1f s: %d text bytes, %d+%d documents, %d+%d tokens (train+val), vocab %d",
        seconds,
        text_bytes,
        len(train_docs),
        len(val_docs),
        done["tokens"]["train"],
        done["tokens"]["val"],
        vocab_size,
    )
    return data_path, model_path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m mobilellm_train.data.demo OUT_DIR [VOCAB_SIZE]")
    print(build_demo_corpus(sys.argv[1], *(int(a) for a in sys.argv[2:])))
