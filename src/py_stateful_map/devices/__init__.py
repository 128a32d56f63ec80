"""Devices: the CUDA devices this process may use (found without initializing CUDA), and groups."""
