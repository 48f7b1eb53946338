"""Model families (one file each, listed in registry.py) and the loaders that
build them from GGUF files, Hugging Face directories or the hub."""
