"""TRL's ``SDFTTrainer`` with LoRA, for ``bench_step.py --lora``: the harness in ../shared/bench/trl_sdft
run unchanged except that the trainer receives a ``peft_config`` (TRL's EMA teacher is then a second
"teacher" adapter, as ours is). Runs in the TRL virtual environment:

    ~/.venvs/trl-anchor/bin/python scripts/trl_lora.py --trl-dir ../shared/bench/trl_sdft --r 16 \
        --alpha 32 -- --model ~/.cache/sdft-bench/smollm2-hf --max-steps 6
"""

from __future__ import annotations

import argparse
import sys

# the projections ours adapts by default (sdft_cli/config/model.py, LoraConfig.target_modules)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-dir", required=True)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    a = ap.parse_args(argv[:cut])
    sys.path.insert(0, a.trl_dir)
    sys.argv = ["bench_trl_sdft.py", *argv[cut + 1 :]]  # the harness parses its arguments on import
    import bench_trl_sdft as harness
    from peft import LoraConfig

    base = harness.SDFTTrainer

    class WithLora(base):
        def __init__(self, *args, **kwargs):
            kwargs["peft_config"] = LoraConfig(
                r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
            )
            super().__init__(*args, **kwargs)

    harness.SDFTTrainer = WithLora
    return harness.main()


if __name__ == "__main__":
    sys.exit(main())
