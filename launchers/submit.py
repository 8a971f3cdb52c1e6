"""Front door: `python launchers/submit.py [overrides]` (Hydra). Argument handling only; logic is in invprop."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from invprop.jobs.submit import run

    run(cfg)


if __name__ == "__main__":
    main()
