#!/usr/bin/env bash
# Installs h2load (Debian's nghttp2-client), the HTTP/2 load generator that drives `make bench`'s throughput
# figures: it spends a few microseconds of CPU per call where ghz spends tens, so the server, not the load
# generator, is what saturates. A no-op when it is installed.
source "$(dirname "$0")/kind-lib.sh"

ensure_apt nghttp2-client
command -v h2load >/dev/null
