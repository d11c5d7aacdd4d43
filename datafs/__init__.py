"""datafs: a shared model-storage filesystem for GPU fleets.

Files are split into 4 MiB chunks named by their BLAKE3 hash; metadata lives in
LMDB; chunks are read from the local cache, then peers, then the object store.
"""

__version__ = "0.1.0"
