"""model-orchestrator: runs llama-server processes and manages GPU memory for n8n workflows."""

__version__ = "0.1.0"
