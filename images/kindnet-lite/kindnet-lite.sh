#!/bin/bash
# kindnet-lite: the part of kindnetd a kind cluster needs, in bash, because kindnetd (a nested module of kind
# without tags) cannot be fetched from the Go module proxy.
# Every 10 s it lists the nodes and
#   * writes this node's CNI conflist (ptp + host-local on the node's podCIDR + portmap), which makes it Ready;
#   * routes every other node's podCIDR via that node's InternalIP (all nodes share one L2 network);
#   * masquerades pod traffic that leaves the pod network.
# Beside that loop runs the ingress NetworkPolicy enforcer, netpol.py (installed at
# /usr/local/lib/kindnet-lite/netpol.py).
set -u
SA=/var/run/secrets/kubernetes.io/serviceaccount
API="https://${CONTROL_PLANE_ENDPOINT:-${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}}"
CONF_DIR=/etc/cni/net.d
CONF="$CONF_DIR/10-kindnet.conflist"
NETPOL=/usr/local/lib/kindnet-lite/netpol.py
: "${NODE_NAME:?NODE_NAME must be set}"
: "${POD_SUBNET:=10.244.0.0/16}"

conflist() {
  cat <<JSON
{
  "cniVersion": "0.4.0",
  "name": "kindnet",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": ${MTU:-1500},
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{"dst": "0.0.0.0/0"}],
        "ranges": [[{"subnet": "$1"}]]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
}

echo "kindnet-lite: node $NODE_NAME, pod subnet $POD_SUBNET, API $API"
# Restarted when it dies; the rules it last applied stay in place meanwhile.
(while true; do
  python3 "$NETPOL"
  echo "netpol enforcer exited ($?); restarting in 5 s"
  sleep 5
done) &
while true; do
  if nodes=$(curl -sSf --max-time 10 --cacert "$SA/ca.crt" -H "Authorization: Bearer $(cat "$SA/token")" \
      "$API/api/v1/nodes"); then
    while IFS=$'\t' read -r name ip cidr; do
      [[ -n "$cidr" && -n "$ip" ]] || continue
      if [[ "$name" == "$NODE_NAME" ]]; then
        want=$(conflist "$cidr")
        if [[ "$(cat "$CONF" 2>/dev/null)" != "$want" ]]; then
          printf '%s\n' "$want" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
          echo "wrote $CONF for $cidr"
        fi
      else
        current=$(ip -4 route show "$cidr")
        if [[ "$current" != *"via $ip "* ]]; then
          ip route replace "$cidr" via "$ip" && echo "route $cidr via $ip ($name)"
        fi
      fi
    done < <(jq -r '.items[] | [.metadata.name,
        ([.status.addresses[]? | select(.type == "InternalIP") | .address | select(test(":") | not)] | first // ""),
        (.spec.podCIDR // "")] | @tsv' <<<"$nodes")
    iptables -t nat -C POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -m comment --comment kindnet-lite \
      -j MASQUERADE 2>/dev/null ||
      iptables -t nat -A POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -m comment --comment kindnet-lite \
        -j MASQUERADE
  else
    echo "listing nodes failed; retrying"
  fi
  sleep "${RESYNC_SECONDS:-10}"
done
