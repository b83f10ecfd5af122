"""mobilellm_train: FSDP2 pretraining of MobileLLM models."""
