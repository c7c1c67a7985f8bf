"""The one ``@hydra.main`` entry: compose -> typed Config -> ``pipeline.run``.

``sdft run ...`` forwards its arguments here unchanged, so every Hydra feature (``-m``, launchers,
``--cfg job``, sweeps) works as Hydra users expect. Importing this module registers the config
schemas and resolvers; that is done at import time on purpose, because launchers such as submitit
unpickle ``hydra_main`` in a fresh process and must find them there too.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sdft_cli.compose import register_configs, register_resolvers, to_config
from sdft_cli.errors import SdftError

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://sdft_cli.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from sdft_cli import pipeline

    try:
        metrics = pipeline.run(to_config(cfg))
    except SdftError as e:
        print(f"sdft: error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records this job as failed and goes on with the others
        sys.exit(2)
    # the value a Hydra sweeper optimises: the final average accuracy over the curriculum
    acc = metrics.get("acc")
    return float(acc) if acc is not None else None


if __name__ == "__main__":
    hydra_main()
