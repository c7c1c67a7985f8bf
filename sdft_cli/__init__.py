"""sdft_cli: continual learning of LLMs with Self-Distillation Fine-Tuning."""

__version__ = "0.1.0"
