"""Evaluation: perplexity (`perplexity.py`), the lm-evaluation-harness adapter
(`lm_eval_adapter.py`, model name `lckv_jax`) and offline multiple-choice tasks
(`multiple_choice.py`). All score through `Scorer`, the jitted log-prob of the parallel forward."""
