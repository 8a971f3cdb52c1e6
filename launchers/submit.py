"""Front door: `python launchers/submit.py [overrides]` (Hydra). Argument handling only; logic is in invprop."""

import os
import sys
from pathlib import Path

# OpenMP threads that spin while they wait collapse when the cores are shared (loader workers, several ranks on
# one machine, a second run): sleeping waiters trade a little speed on idle cores for that (tools/bench_omp_wait.py).
# Set here, before torch loads OpenMP; the spawned ranks and SLURM jobs inherit it. An explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import invprop  # noqa: F401, E402  (registers the config resolvers)

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
