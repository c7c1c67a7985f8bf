"""Hydra config tree of sdft_cli (shipped in the wheel as the package `sdft_cli.conf`)."""
