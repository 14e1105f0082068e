"""Fuzzing the postcard decoder and both transports (``python -m tests.fuzz --inputs 100000``)."""
