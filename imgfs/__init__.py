"""imgfs: a read-only FUSE gateway that serves cloud disk images as raw files."""

__version__ = "0.1.0"
