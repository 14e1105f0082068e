"""BlazenPeer operator."""
