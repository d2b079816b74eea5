"""corda-surgery: data-driven (CorDA / CorDA++) LoRA initialisation as offline checkpoint surgery."""

__version__ = "0.2.0"
