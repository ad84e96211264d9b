#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and the KubeRay operator from their published Go modules into
# .cache/kubestack/bin/<hash>/, where <hash> covers this folder's go.mod/go.sum files and Go
# sources: a warm run (same hash, binaries present) builds nothing. Prints the bin directory.
#   kubestack/build.sh            build if needed, print the directory
#   kubestack/build.sh --print    print the directory only (nothing is built)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
key="$(cd "$here" && cat go.mod go.sum kuberay/go.mod kuberay/go.sum build.sh \
        $(find cmd -name '*.go' | sort) | sha256sum | cut -c1-16)"
bin="$root/.cache/kubestack/bin/$key"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kuberay-operator)

if [[ "${1:-}" == "--print" ]]; then
    echo "$bin"
    exit 0
fi
complete=1
for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || complete=0; done
if [[ $complete == 1 ]]; then
    echo "$bin"
    exit 0
fi

command -v go >/dev/null || { echo "kubestack/build.sh: go is not on PATH (Go 1.26 or newer)" >&2; exit 1; }
# -mod=mod: go.sum is committed and checked; the module cache fills on first use.
export GOFLAGS="-mod=mod" CGO_ENABLED=0
flags=(-trimpath "-ldflags=-s -w")
tmp="$bin.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
start=$SECONDS
# Lowest CPU priority: the build takes minutes of both cores on a 2-core machine.
(cd "$here" && nice -n 19 go build "${flags[@]}" -o "$tmp/" ./cmd/etcd \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler) >&2
(cd "$here/kuberay" && nice -n 19 go build "${flags[@]}" -o "$tmp/kuberay-operator" \
    github.com/ray-project/kuberay/ray-operator) >&2
# KubeRay's CRDs exactly as its module ships them (ray-operator/config/crd/bases).
crd_dir="$(cd "$here/kuberay" && go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)/config/crd/bases"
mkdir -p "$tmp/crds" "$tmp/rbac"
cp "$crd_dir"/ray.io_*.yaml "$tmp/crds/"
# KubeRay's own ClusterRole (config/rbac/role.yaml): its operator runs with exactly these grants.
cp "$crd_dir/../../rbac/role.yaml" "$tmp/rbac/kuberay-operator-role.yaml"
chmod u+w "$tmp/crds"/* "$tmp/rbac"/*
rm -rf "$bin"
mv "$tmp" "$bin"
echo "kubestack/build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin"
