"""The batching engine: one thread owns the llama.cpp context and decodes all sequences.

Every active sequence contributes to one ``llama_batch`` per step: a token each while
generating, prompt chunks while reading.
"""
