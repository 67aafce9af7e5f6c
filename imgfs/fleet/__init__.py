"""Fleet mode: every node's chunk reads of large images go through the node's own nginx, which hashes
each chunk to an owner node (consistent hashing over the members) and asks that node's nginx over
mutual TLS. The owner's nginx caches the chunk, fetched once for the whole fleet through the owner's
imgfs (the origin gateway: the only holder of store credentials). Anything wrong with the mesh makes
imgfs read that chunk from the origin itself.

- ``mesh``: the reading side (a store wrapper that asks the local nginx first, checks what it gets, and
  falls back to the origin), with its counters;
- ``gateway``: the origin gateway the local nginx fetches through (loopback, a per-node secret);
- ``render``: the nginx configuration of one node.
"""
