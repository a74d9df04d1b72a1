"""Sans-I/O wire protocol: frames, messages and the per-stream request/response codec."""
