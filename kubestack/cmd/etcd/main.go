// etcd for the local control plane: the upstream server's own entry point (the etcd binary's
// main is this one call), built from go.etcd.io/etcd/server/v3 at the version kube-apiserver
// is built against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
