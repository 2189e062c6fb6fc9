"""Integrations with other libraries (Hugging Face transformers), each loaded on first use."""


def __getattr__(name: str):
    if name == "transformers":
        import importlib

        return importlib.import_module("llmkern.integrations.transformers")
    raise AttributeError(f"module 'llmkern.integrations' has no attribute {name!r}")
