"""``python -m sdft_cli run ...``: the ``sdft`` command, for launchers that start a module
(``torchrun --nproc-per-node 8 -m sdft_cli run ...``)."""

from sdft_cli.cli import app

app()
