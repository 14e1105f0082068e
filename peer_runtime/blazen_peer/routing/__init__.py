"""The fleet router's parts (docs/router.md): the routing table (which pools serve a request), replica
choice, the session-ref owner map, the pools and their descriptions, and the forwarding itself.
``blazen_peer.router`` serves them through the same listeners and admission as a peer."""
