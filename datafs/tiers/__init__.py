"""Where chunks come from: the local cache, peers, the object store, behind one
read-through chain (`chain.ChunkSource`)."""
