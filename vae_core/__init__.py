"""The VAE core: data, models, objectives, the Lab (runs trained here or followed), run directories, the CLI.

Never imports Streamlit, and importing the package changes nothing in the environment:
readers start at vae_core.lab. The dashboard (app.py) and the CLI (__main__.py) set GOMP_SPINCOUNT
for themselves before torch loads.
"""
