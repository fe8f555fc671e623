"""Embedded models (made in code) and their tokenizer files."""
