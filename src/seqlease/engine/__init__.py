"""The session backend's batching engine: one thread owns the llama.cpp context.

Every active sequence contributes to one ``llama_batch`` per step: a token each while
generating, prompt chunks while reading (``schedule``). ``ledger`` records what each sequence
holds in KV memory; ``sampling`` builds a sequence's sampler chain.
"""
