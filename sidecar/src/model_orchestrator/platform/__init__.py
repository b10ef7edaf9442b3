"""Platform: what everything else stands on and that imports nothing of the package above it: errors (every code,
`Refused`), settings (each once, with its environment variable), the GPU view (NVML or CPU mode), the state dir's
lock, outbound calls with deadlines on threads of their own, the revision counter the status views key on, and the
page cache (what of a file is in memory; reading in the rest)."""
