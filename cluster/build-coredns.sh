#!/usr/bin/env bash
# Builds CoreDNS (the cluster's DNS: stage and controller Services resolve to pod IPs) from the
# Go module proxy, pinned, into the per-machine cache next to the Kubernetes binaries. A second
# call finds the binary and returns at once. No CoreDNS code is committed: `go install` of the
# published module (its go.mod has no replace lines, so @version works).
set -euo pipefail

COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
CACHE=${EDGEPIPE_KUBE_CACHE:-/var/cache/edgepipe/kubernetes}
OUT="$CACHE/coredns-$COREDNS_VERSION"
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

if [ -x "$OUT/bin/coredns" ]; then
    echo "coredns $COREDNS_VERSION: cached in $OUT/bin"
    exit 0
fi
[ -x "$GO" ] || { echo "build-coredns: no go toolchain (looked for $GO)" >&2; exit 2; }
start=$(date +%s)
mkdir -p "$OUT"
echo "coredns $COREDNS_VERSION: building"
CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$OUT/tmp" "$GO" install -trimpath -ldflags "-s -w" \
    "github.com/coredns/coredns@$COREDNS_VERSION"
mkdir -p "$OUT/bin"
mv "$OUT/tmp/coredns" "$OUT/bin/coredns"      # the binary appears only when complete
rmdir "$OUT/tmp"
"$OUT/bin/coredns" -version
echo "coredns $COREDNS_VERSION: built in $(( $(date +%s) - start )) s into $OUT/bin"
