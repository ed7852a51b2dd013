"""The Streamlit UI over vae_core: app.py routes, panels/ draw, state.py holds the run registry."""
