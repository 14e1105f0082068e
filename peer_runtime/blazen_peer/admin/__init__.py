"""The admin listener (``--admin-addr``, plain HTTP): health, readiness, metrics, info; plus the gRPC
health service. Import the submodules: ``readiness``, ``metrics``, ``app``, ``health``."""
