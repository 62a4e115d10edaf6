"""Shared pieces of the staged LLM training pipeline."""
