"""pve-gpu-hook: free a shared passed-through GPU for vzdump backups and put every guest back."""

__version__ = "0.1.0"
