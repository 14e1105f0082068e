"""``make bench``: Blazen's Rust server vs a bare grpcio server vs our runtime, all driven by ghz."""
