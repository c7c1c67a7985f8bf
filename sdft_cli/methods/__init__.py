"""Training methods, picked by name: each trains the student on one task and returns its HF directory."""

from sdft_cli.methods import sdft, sft

METHODS = {"sdft": sdft.train_task, "sft": sft.train_task}
