from slurm_fixtures import slurm_cluster  # noqa: F401  (the local SLURM cluster fixture)
