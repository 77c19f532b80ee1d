"""Train a DeepSeek-V3-style model with Lightning.

    python recipes/train.py fit --config recipes/configs/debug.yaml
    python recipes/train.py fit --config recipes/configs/debug.yaml --ckpt_path runs/debug/.../last.ckpt

Every Trainer, model and data argument can be set in the YAML or on the command line (LightningCLI).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.module import DeepSeekV3Module


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        DeepSeekV3Module,
        DSV3DataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
