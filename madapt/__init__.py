"""madapt: declare, train, store, merge and serve many LoRA adapters on one base LLM, on Ray."""

__version__ = "0.1.0"
