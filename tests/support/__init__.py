"""What the test tiers share: ``ports`` (one ``free_port``), ``pki`` (one test PKI), ``peers`` (one factory
for real peers on loopback, in process or as a ``blazen-peer serve`` subprocess), ``controlplane`` (a real
kube-apiserver for the API and scale tests), ``tcpproxy`` (a TCP forwarder that can freeze its connections)
and ``blazen_wheel`` (running the real ``blazen`` wheel). No tests here."""
