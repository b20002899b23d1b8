"""One module per sub-command of ``pve-gpu-hook``."""
