"""Images: generation through diffusers pipelines (`diffusion.py`)."""
