"""Discovery: finding which nodes hold a share, with no tracker or server of ours.

Backends (private Kademlia DHT, the public Mainline DHT, LAN beacons, an in-memory one for
tests) sit behind one small seam (`seam.Finder`); the daemon runs several at once.
"""
