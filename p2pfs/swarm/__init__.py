"""Sans-I/O swarming: which chunk to ask of which peer, and how much to keep in flight.

:class:`PiecePicker` (rarest first, random start, in-order ties, endgame) and
:class:`PipelineController` (per-peer request depth from measured throughput and RTT). No
clocks, sockets or threads: times and randomness come in as parameters.
"""

from p2pfs.swarm.picker import PickPolicy, PiecePicker
from p2pfs.swarm.pipeline import PipelineController

__all__ = ["PickPolicy", "PiecePicker", "PipelineController"]
