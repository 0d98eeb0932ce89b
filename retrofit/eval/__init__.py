"""Evaluation: the lm-eval adapter, Monte-Carlo likelihood, the LLaDA sampler, offline task variants."""
