"""Training methods: the one table of them.

A method is its schema (``config/method.py``: every key and its check), its train function (one task,
returns the trained student's HF directory) and its values, ``conf/method/<name>.yaml``, which extends the
schema Hydra knows as ``schema/method/<name>``. ``offline_distill``, ``sft_teacher`` and ``dft`` are
configurations of the SDFT and SFT loops (``generate_from``, ``targets``, ``token_weighting``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdft_cli.config import (
    DFTConfig,
    MethodConfig,
    OfflineDistillConfig,
    SDFTConfig,
    SFTConfig,
    SFTReinvokeConfig,
    SFTTeacherConfig,
)
from sdft_cli.methods import reinvoke, sdft, sft
from sdft_cli.methods.context import TrainContext
from sdft_cli.tasks import Task


@dataclass(frozen=True)
class Method:
    schema: type[MethodConfig]
    train: Callable[[TrainContext, Task], Path]

    @property
    def config_file(self) -> str:
        """Its values, relative to the config tree."""
        return f"method/{self.schema.name}.yaml"


METHODS: dict[str, Method] = {
    "sdft": Method(SDFTConfig, sdft.train_task),
    "offline_distill": Method(OfflineDistillConfig, sdft.train_task),
    "sft": Method(SFTConfig, sft.train_task),
    "sft_teacher": Method(SFTTeacherConfig, sft.train_task),
    "dft": Method(DFTConfig, sft.train_task),
    "sft_reinvoke": Method(SFTReinvokeConfig, reinvoke.train_task),
}
