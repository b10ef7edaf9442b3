"""What the tests share: one NVML stand-in (nvml.py), helpers for processes and sidecars (helpers.py), the n8n
driver (n8n.py), a Hugging Face Hub mirror (hf_mirror.py). Tests import from here, never from each other."""
