"""The private DHT: the ``kademlia`` package extended with provider records and write tokens.

``finder.DhtFinder`` is the trio-facing ``Finder``; ``node.DhtNode`` runs on the DHT's own
asyncio loop (and in the simulation); ``protocol``, ``messages``, ``records`` and ``tokens``
are the wire protocol, its validation, and the sans-I/O record store and token scheme.
"""
