#!/usr/bin/env bash
# Builds the Kubernetes binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy), etcd and the pause binary from the Go module proxy, pinned and
# version-stamped, into a per-machine cache keyed by version. A second call finds the stamp
# and returns at once. The project commits no Kubernetes code: a wrapper module requires
# k8s.io/kubernetes and maps each staging module (Kubernetes' own go.mod replaces them with
# ./staging paths) to its published v0.X.Y.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.13}
CACHE=${EDGEPIPE_KUBE_CACHE:-/var/cache/edgepipe/kubernetes}
OUT="$CACHE/$KUBE_VERSION"
STAMP="$OUT/.built-$KUBE_VERSION-etcd-$ETCD_VERSION"
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"

if [ -f "$STAMP" ]; then
    echo "kubernetes $KUBE_VERSION: cached in $OUT/bin"
    exit 0
fi
[ -x "$GO" ] || { echo "build-kubernetes: no go toolchain (looked for $GO)" >&2; exit 2; }
mkdir -p "$OUT/bin" "$OUT/src/kube" "$OUT/src/etcd"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
start=$(date +%s)

staging_replaces() {  # the staging modules named in Kubernetes' own go.mod
    local gomod
    gomod=$(cd / && GOFLAGS= "$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
        | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    sed -n 's#^\s*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$gomod"
}

echo "kubernetes $KUBE_VERSION: writing the wrapper module"
staging_version="v0.${KUBE_VERSION#v1.}"
staging=$(staging_replaces)
[ -n "$staging" ] || { echo "build-kubernetes: no staging modules found in k8s.io/kubernetes@$KUBE_VERSION's go.mod" >&2; exit 1; }
cd "$OUT/src/kube"
{
    echo "module edgepipe.local/kubebuild"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $staging_version"; done
    echo ")"
} > go.mod
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
for c in $COMPONENTS; do
    echo "kubernetes $KUBE_VERSION: building $c ($(( $(date +%s) - start )) s so far)"
    "$GO" build -trimpath -ldflags "$ldflags" -o "$OUT/bin/$c" "k8s.io/kubernetes/cmd/$c"
done

echo "etcd $ETCD_VERSION: building"
cd "$OUT/src/etcd"
cat > go.mod <<MOD
module edgepipe.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
cat > main.go <<'SRC'
// etcd's own entry point, built from its published module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
SRC
"$GO" build -trimpath -ldflags "-s -w" -o "$OUT/bin/etcd" .

echo "pause: compiling Kubernetes' pause.c statically"
kdir=$(cd "$OUT/src/kube" && "$GO" list -m -f '{{.Dir}}' k8s.io/kubernetes)
gcc -Os -static -DVERSION="$KUBE_VERSION" -o "$OUT/bin/pause" "$kdir/build/pause/linux/pause.c"

"$OUT/bin/kube-apiserver" --version
touch "$STAMP"
echo "kubernetes $KUBE_VERSION: built in $(( $(date +%s) - start )) s into $OUT/bin"
