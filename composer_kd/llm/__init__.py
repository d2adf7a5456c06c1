"""Distillation from llm-foundry's YAML: the ``distillation`` algorithm and the ``teacher_signal`` dataloader that
llm-foundry's registries find through this package's entry points."""
