"""Model files: what a model is (the registry), how llama-server is started for it (its argument list), where its
files come from (the Hub, a PyPI wheel, a path, generated), what its GGUF header says and how much GPU memory that
means, and the llama-server build itself. Imports only platform/."""
