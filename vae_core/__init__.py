"""The VAE core: data, models, objectives, the threaded trainer, run directories and the CLI.

Never imports Streamlit; the dashboard reads it through vae_core.trainer.Trainer.
"""
import os

# Set before torch loads GNU OpenMP, which reads it once; every entry point (CLI, dashboard,
# library) imports this package before torch. An OpenMP thread that finds no work polls for up to
# 300,000 rounds (GNU's default) before it sleeps. When training shares the CPU (the dashboard:
# server and browser on the same cores) that polling burns the trainer's own share while its
# partner thread waits for a core: around each live refresh the trainer ran at 25-35% of its quiet
# speed, 55-63% with 10,000 rounds. The headless CLI keeps its speed (+3% +- 3%, 6 alternating
# pairs); lower values looked slower when quiet (README, "Measured here"). A user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
