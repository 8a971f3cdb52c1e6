"""Front door: `python launchers/submit.py [overrides]` (Hydra). Argument handling only; logic is in invprop."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import invprop  # noqa: F401  (registers the config resolvers)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from invprop.jobs.submit import run

    run(cfg)


def check_sweep(argv: list[str]) -> None:
    """A sweep's launcher submits from inside Hydra; check every element here first, so none is submitted."""
    if not {"-m", "--multirun"} & set(argv):
        return
    from invprop.jobs.sweep import validate_sweep

    problems = validate_sweep([a for a in argv if not a.startswith("-")], CONFIGS)
    if problems:
        print("config error (nothing submitted):\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_sweep(sys.argv[1:])
    main()
