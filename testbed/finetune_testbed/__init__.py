"""The project's test bed: the parts tests and benchmarks run the operator and trainer against.

- `emulator`: a Kubernetes API server emulator (kmock-based) with admission from the CRDs'
  schemas and CEL rules (`schema_validation`), watches, garbage collection and a recorder of
  every call per identity; `kube`: a running one and the ways to talk to it (`client`, kubeconfig,
  kubectl);
- `kuberay_standin`: plays KubeRay's part (RayClusters become ready, pointing at a real head);
- `ray_head`: a real local Ray head with token auth;
- `s3`: a real moto S3 server, on a thread or as a process;
- `chart` and `rbac`: the Helm chart as Helm renders it, and its RBAC against recorded calls;
- `pytest_plugin`: the fixtures (`kube`, `kuberay`, `ray_head`, `s3_server`).
"""
