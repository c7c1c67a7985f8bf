"""Training methods, picked by name: each trains the student on one task and returns its HF directory."""

from sdft_cli.methods import reinvoke, sdft, sft

# offline_distill and dft are configurations of the same two loops (generate_from, token_weighting)
METHODS = {
    "sdft": sdft.train_task,
    "offline_distill": sdft.train_task,
    "sft": sft.train_task,
    "dft": sft.train_task,
    "sft_reinvoke": reinvoke.train_task,
}
