"""Cache stores: content-addressed bodies on disk, response entries with a memory front."""
from .blobstore import (BlobStore, DigestMismatch, Fill, FillFailed, FillReader, FillState,
                        PassThroughGap, StoreFull)
from .entries import Entry, EntryStore

__all__ = ["BlobStore", "Fill", "FillReader", "FillState", "FillFailed", "PassThroughGap",
           "DigestMismatch", "StoreFull", "Entry", "EntryStore"]
