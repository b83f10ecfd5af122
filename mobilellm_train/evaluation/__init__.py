"""Evaluation of MobileLLM checkpoints: the paper's eight zero-shot tasks with
lm-evaluation-harness's prompts and metrics, WikiText-2 and token-data perplexity.

    mobilellm-eval --checkpoint <DCP step folder or HF folder> --data-dir <tasks> [--tasks ...]

- tasks.py       the tasks: local files in their public layouts -> (context, continuation) requests
- scoring.py     loglikelihood batching, acc / acc_norm, `evaluate_tasks` (one process or all FSDP ranks)
- perplexity.py  WikiText-2 the original way, token data as the trainer packs it
- report.py      the results table, the paper's rows, TensorBoard scalars
- loading.py     model and tokenizer from a DCP step folder or an HF folder
- cli.py         the mobilellm-eval command
"""
