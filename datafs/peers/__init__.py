"""The peer tier: nodes of one datacenter serve chunks to each other before
anyone asks the object store.

- `ownership`: which live node owns a chunk (rendezvous hashing: a join or a
  leave moves only about 1/N of the chunks, and every node computes the same
  owner and the same fallback order from the same member list);
- `auth`: every request carries an HMAC of its method, path and time under
  the fleet secret;
- `server` and `client`: HTTP/1.1 (h11 on trio) for chunk bodies, sent with
  sendfile from the cache file and received into one preallocated buffer.
"""
