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


def check_command_line(argv: list[str]) -> None:
    """Composition errors become one line here, before Hydra runs anything; a sweep's launcher submits from
    inside Hydra, so every element is also validated here first and none is submitted if one is bad."""
    from invprop.jobs.sweep import check_command_line as problems_of

    sweep = bool({"-m", "--multirun"} & set(argv))
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # Hydra's own flags (--help, --cfg, -cn, ...): Hydra handles the command line
    problems = problems_of(argv if not sweep else [a for a in argv if not a.startswith("-")], CONFIGS,
                           check_values=sweep)
    if problems:
        head = "config error (nothing submitted):" if sweep else "config error:"
        print(head + ("\n  " + "\n  ".join(problems) if sweep else " " + problems[0]), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
