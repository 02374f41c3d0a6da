"""Locally built model families (tiny synthetic Llama, SmolLM2-135M from GGUF) for tests and demos."""
