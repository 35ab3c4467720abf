"""The native binding adapter: the only code that touches ``llama_cpp.llama_cpp`` names.

``library`` imports the binding and routes its logs, ``memory`` maps the per-sequence memory API
families, and ``model``, ``context`` and ``sampler`` wrap the native objects, validating every
argument llama.cpp would abort on.
"""
