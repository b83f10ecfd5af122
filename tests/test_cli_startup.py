"""Every command answers --help and a bad command line without importing torch (or torchdata,
transformers, pyarrow, sentencepiece): those take seconds to import, so the answer would too.

Checked by module contents, not by wall-clock time: each command runs in a fresh interpreter
through a tiny wrapper that reports which heavy modules were imported when it exited."""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

HEAVY = ("torch", "torchdata", "transformers", "pyarrow", "sentencepiece")

# The report is an exit handler: `mobilellm-train` ends its process without the interpreter's
# teardown (train.cli), after running the exit handlers.
WRAPPER = """
import atexit, runpy, sys
atexit.register(lambda: print("HEAVY=" + ",".join(m for m in %r if m in sys.modules)))
module, *argv = sys.argv[1:]
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
""" % (HEAVY,)

CASES = [
    # (module, arguments, exit status, text the answer must hold)
    ("mobilellm_train.train", ["--help"], 0, "--training.steps"),
    ("mobilellm_train.train", ["--trainig.steps", "3"], 2, "unknown section 'trainig'"),
    ("mobilellm_train.train", ["--training.steps", "many"], 2, "training.steps: not an integer"),
    ("mobilellm_train.data.prepare", ["--help"], 0, "encode"),
    ("mobilellm_train.data.prepare", ["encode", "--tokenizer", "t.model"], 2, "--input"),
    ("mobilellm_train.bench", ["--help"], 0, "--presets"),
    ("mobilellm_train.bench", ["--steps", "x"], 2, "--steps"),
    ("mobilellm_train.evaluation.cli", ["--help"], 0, "--checkpoint"),
    ("mobilellm_train.evaluation.cli", ["--tasks", "boolq"], 2, "--checkpoint"),
    ("mobilellm_train.generate", ["--help"], 0, "--prompt"),
    ("mobilellm_train.generate", ["--checkpoint", "x", "--temperature", "hot"], 2, "--temperature"),
    ("mobilellm_train.export", ["--help"], 0, "--out"),
    ("mobilellm_train.export", ["--checkpoint", "x"], 2, "--out"),
    ("mobilellm_train.plan", ["--help"], 0, "--card"),
    ("mobilellm_train.plan", ["--card", "tpu"], 2, "--card"),
    ("mobilellm_train.average", ["--help"], 0, "--weights"),
    ("mobilellm_train.average", ["--checkpoint", "a", "--checkpoint", "b", "--out", "c", "--weights", "1"], 2,
     "--weights has 1 numbers for 2 checkpoints"),
]


@pytest.mark.parametrize("module, args, status, text", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_help_and_argument_errors_import_nothing_heavy(module, args, status, text):
    r = subprocess.run([sys.executable, "-c", WRAPPER, module, *args], capture_output=True, text=True,
                       cwd=ROOT, env=subprocess_env(), timeout=120)
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]
    assert text in r.stdout + r.stderr
    heavy = r.stdout.strip().splitlines()[-1]
    assert heavy == "HEAVY=", f"{module} {' '.join(args)} imported {heavy[len('HEAVY='):]}"
