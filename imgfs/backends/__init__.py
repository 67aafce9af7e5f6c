"""Stores that hold image bytes. Each backend is synchronous (called from worker threads) and knows
nothing of FUSE, trio or the cache; failures are raised as ``imgfs.errors`` classes."""

from __future__ import annotations

from ..config import CinderStoreConfig, FileStoreConfig, ImgfsOptions, S3StoreConfig, StoreConfig
from .base import Backend


def build(store: StoreConfig, options: ImgfsOptions, instance: str = "") -> Backend:
    """``instance`` names this daemon among others on the host (its mount point): stores that leave
    marks outside the host (Cinder attachments) tell their own from a sibling instance's by it."""
    if isinstance(store, S3StoreConfig):
        from .s3 import S3Backend  # boto3 is imported only when an S3 store is configured

        return S3Backend(store, options)
    if isinstance(store, FileStoreConfig):
        from .file import FileBackend

        return FileBackend(store)
    if isinstance(store, CinderStoreConfig):
        from .cinder import CinderBackend  # cinderclient, keystoneauth and os-brick only when needed

        return CinderBackend(store, options, instance)
    raise TypeError(f"no backend for {store!r}")
